using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace DiffBIR.Lab.Metrics.Musiq;

/// <summary>
/// Everything MUSIQ computes for a batch, in the order it computes it (the fixtures' intermediates).
/// </summary>
/// <param name="Patches">[N, seq, 3·P²+3]: patch values in [−1,1] (zero padding), then spatial, scale and mask channels.</param>
/// <param name="SpatialPositions">int64 [N, seq]: hashed spatial position index in [0, G²).</param>
/// <param name="ScalePositions">int64 [N, seq]: scale id (rank of the longer side; the original resolution last).</param>
/// <param name="Mask">int64 [N, seq]: 1 real patch, 0 padding.</param>
/// <param name="Tokens">[N, seq, hidden]: the patch stem + embedding Linear.</param>
/// <param name="Encoded">[N, seq+1, hidden]: after the final encoder LayerNorm, [CLS] first.</param>
/// <param name="Head">[N, num_class]: head([CLS]) (Softmax probabilities when num_class &gt; 1).</param>
/// <param name="Dist">[N, num_class]: the head output averaged over crops (one crop per image at inference).</param>
/// <param name="Score">[N, 1]: Σᵢ i·distᵢ (i = 1..num_class); the raw head value when num_class = 1.</param>
public sealed record MusiqTrace(Tensor Patches, Tensor SpatialPositions, Tensor ScalePositions, Tensor Mask, Tensor Tokens,
    Tensor Encoded, Tensor Head, Tensor Dist, Tensor Score) : IDisposable
{
    public void Dispose()
    {
        foreach (var t in new[] { Patches, SpatialPositions, ScalePositions, Mask, Tokens, Encoded, Head, Dist, Score }) t.Dispose();
    }
}

/// <summary>
/// MUSIQ, the multi-scale image quality transformer (Ke et al., ICCV 2021), exactly as pyiqa runs it at inference
/// (pyiqa/archs/musiq_arch.py <c>MUSIQ</c>, metrics 'musiq' / 'musiq-spaq' / 'musiq-paq2piq' with num_class = 1 and
/// 'musiq-ava' with num_class = 10). Field names are the official <c>state_dict</c> keys, so a released
/// <c>musiq_*_ckpt-*.pth</c> loads strictly with <c>StateDictLoader.Load</c>.
/// </summary>
/// <remarks>
/// Input convention (<see cref="Score"/>): float32 RGB, NCHW, values in [0, 1] (pyiqa's assertion, with its 1e-6
/// slack), any height and width. The image is mapped to [−1, 1] and represented at each longer side of
/// <see cref="MusiqConfig.LongerSideLengths"/> (aspect preserved, bicubic) plus, unless disabled, its original
/// resolution — where every P×P patch is a token, so the cost grows with the image area (pyiqa does the same). All
/// images of a batch share one size; each gets its own score.
/// </remarks>
public sealed class MusiqModel : nn.Module
{
    private const int ResnetTokenDim = 64;

    private readonly StdConv conv_root;
    private readonly GroupNorm gn_root;
    private readonly MusiqBottleneck block1;
    private readonly Linear embedding;
    private readonly MusiqTransformerEncoder transformer_encoder;
    private readonly nn.Module<Tensor, Tensor> head;

    public MusiqConfig Config { get; }

    /// <param name="config">The architecture (<see cref="MusiqConfig.Koniq"/> / <see cref="MusiqConfig.Ava"/> for the released metrics).</param>
    public MusiqModel(MusiqConfig config) : base("MUSIQ")
    {
        Config = config;
        if (config.PatchSize % 4 != 0) throw new ArgumentException($"MUSIQ: patch_size {config.PatchSize} must be a multiple of 4 (the stem reduces by 4)");
        conv_root = new StdConv(3, ResnetTokenDim, 7, 2);
        gn_root = GroupNorm32.Create(ResnetTokenDim, 1e-6);
        block1 = new MusiqBottleneck(ResnetTokenDim, ResnetTokenDim * 4);
        var tokenPatchSize = config.PatchSize / 4;
        embedding = nn.Linear(ResnetTokenDim * 4 * tokenPatchSize * tokenPatchSize, config.HiddenSize);
        transformer_encoder = new MusiqTransformerEncoder(config.HiddenSize, config.MlpDim, config.NumHeads, config.NumLayers,
            config.NumScales, config.SpatialPosGridSize, config.UseScaleEmb);
        head = config.NumClass > 1
            ? nn.Sequential(("0", nn.Linear(config.HiddenSize, config.NumClass)), ("1", nn.Softmax(-1)))
            : nn.Linear(config.HiddenSize, config.NumClass);
        RegisterComponents();
    }

    /// <summary>
    /// The quality score of each image, as pyiqa's <c>InferenceModel('musiq' | 'musiq-ava' | …)(x)</c> returns it.
    /// </summary>
    /// <param name="x">float32 [N, 3, H, W] RGB in [0, 1]; any H, W (all images of the batch the same size).</param>
    /// <returns>[N, 1]: the MOS (KonIQ-style, num_class = 1) or the AVA mean score in [1, 10] (num_class = 10).</returns>
    public Tensor Score(Tensor x)
    {
        using var scope = NewDisposeScope();
        // The other intermediates stay in this scope and are freed with it (disposing the trace would free the score too).
        var trace = Trace(x);
        return trace.Score.MoveToOuterDisposeScope();
    }

    /// <summary><see cref="Score"/> with every intermediate (the fixtures' outputs); the caller disposes it.</summary>
    public MusiqTrace Trace(Tensor x)
    {
        CheckInput(x);
        using var noGrad = no_grad();
        using var scope = NewDisposeScope();
        var patches = Preprocess(x);
        var t = Forward(patches);
        var kept = new MusiqTrace(patches, t.SpatialPositions, t.ScalePositions, t.Mask, t.Tokens, t.Encoded, t.Head, t.Dist, t.Score);
        foreach (var tensor in new[] { kept.Patches, kept.SpatialPositions, kept.ScalePositions, kept.Mask, kept.Tokens, kept.Encoded, kept.Head, kept.Dist, kept.Score })
            tensor.MoveToOuterDisposeScope();
        return kept;
    }

    /// <summary>pyiqa's eval preprocessing: (x − 0.5)·2, then <see cref="MusiqPatches.Extract"/> → [N, seq, 3·P²+3].</summary>
    public Tensor Preprocess(Tensor x)
    {
        using var scope = NewDisposeScope();
        var normalised = (x - 0.5) * 2;
        return MusiqPatches.Extract(normalised, Config.PatchSize, Config.PatchSize, Config.SpatialPosGridSize,
            Config.LongerSideLengths, Config.MaxSeqLenFromOriginalRes).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// The network on precomputed patches (pyiqa's training-mode input): [N, seq, 3·P²+3] or [N, crops, seq, 3·P²+3].
    /// The returned trace has no <c>Patches</c> (an empty tensor there).
    /// </summary>
    public MusiqTrace Forward(Tensor patches)
    {
        using var scope = NewDisposeScope();
        long b, numCrops, seqLen, dim;
        var x = patches;
        if (x.dim() == 4)
        {
            (b, numCrops, seqLen, dim) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
            x = x.reshape(b * numCrops, seqLen, dim);
        }
        else if (x.dim() == 3) { (b, seqLen, dim) = (x.shape[0], x.shape[1], x.shape[2]); numCrops = 1; }
        else throw new ArgumentException($"MUSIQ: patches must be [N, seq, dim] or [N, crops, seq, dim], got [{string.Join(", ", x.shape)}]");
        var p = Config.PatchSize;
        if (dim != 3L * p * p + 3) throw new ArgumentException($"MUSIQ: patch vectors have {dim} values; patch_size {p} needs {3 * p * p + 3}");

        var spatial = x[.., .., -3];
        var scales = x[.., .., -2];
        var masks = x[.., .., -1].to_type(ScalarType.Bool);
        var pixels = x[.., .., ..^3].reshape(-1, 3, p, p);

        var y = conv_root.forward(pixels);
        y = gn_root.forward(y);
        // root_pool: ReLU, TF-'SAME' zero padding (values are ≥ 0 here), MaxPool 3/2.
        y = F.max_pool2d(SamePadding.Pad(F.relu(y), 3, 2), 3, 2);
        y = block1.forward(y);
        // (N, h, w, C) flattening: the TF checkpoint's channel order.
        var n = x.shape[0];
        var tokens = embedding.forward(y.permute(0, 2, 3, 1).reshape(n, seqLen, -1));
        var encoded = transformer_encoder.forward(tokens, spatial, scales, masks);
        var q = head.forward(encoded[.., 0]);
        var dist = q.reshape(b, numCrops, -1).mean(new long[] { 1 });
        var score = DistToMos(dist);

        var result = new MusiqTrace(empty(0), spatial.to_type(ScalarType.Int64), scales.to_type(ScalarType.Int64),
            masks.to_type(ScalarType.Int64), tokens, encoded, q, dist, score);
        foreach (var tensor in new[] { result.Patches, result.SpatialPositions, result.ScalePositions, result.Mask, result.Tokens, result.Encoded, result.Head, result.Dist, result.Score })
            tensor.MoveToOuterDisposeScope();
        return result;
    }

    /// <summary>Σᵢ i·distᵢ over the last axis, i = 1..C, keeping it: [*, C] → [*, 1] (pyiqa's <c>dist_to_mos</c>).</summary>
    public static Tensor DistToMos(Tensor dist)
    {
        using var weights = arange(1, dist.shape[^1] + 1, dtype: dist.dtype, device: dist.device);
        using var weighted = dist * weights;
        return weighted.sum(new long[] { -1 }, keepdim: true);
    }

    static void CheckInput(Tensor x)
    {
        if (x.dim() != 4 || x.shape[1] != 3)
            throw new ArgumentException($"MUSIQ: input must be RGB [N, 3, H, W], got [{string.Join(", ", x.shape)}]");
        if (!x.is_floating_point())
            throw new ArgumentException($"MUSIQ: input must be a float tensor (float32 as pyiqa runs it), got {x.dtype}");
        using var min = x.min();
        using var max = x.max();
        double lo = min.to_type(ScalarType.Float64).item<double>(), hi = max.to_type(ScalarType.Float64).item<double>();
        // pyiqa: assert x.min() > -1e-6 and x.max() < 1 + 1e-6
        if (!(lo > -1e-6 && hi < 1 + 1e-6))
            throw new ArgumentException($"MUSIQ: input must be in [0, 1], got min={lo:G4}, max={hi:G4}");
    }
}
