using DiffBIR.Lab.Checkpoints;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Metrics.Maniqa;

/// <summary>
/// MANIQA's transposed-attention block (official <c>TABlock</c>): attention ACROSS CHANNELS. x is [B, C, N] with N = T²
/// tokens; q, k, v are Linear maps over the token axis (N → N); attn = softmax(q·kᵀ · N^-½) is C×C. The official
/// output is <c>(attn @ v).transpose(1, 2).reshape(B, C, N)</c> — a transpose followed by a reshape, which is not
/// the identity layout; it is kept as is because the released weights were trained with it.
/// </summary>
public sealed class TABlock : nn.Module<Tensor, Tensor>
{
    readonly Linear c_q, c_k, c_v;
    readonly double normFact;

    public TABlock(int dim) : base(nameof(TABlock))
    {
        c_q = nn.Linear(dim, dim);
        c_k = nn.Linear(dim, dim);
        c_v = nn.Linear(dim, dim);
        normFact = Math.Pow(dim, -0.5);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        long b = x.shape[0], c = x.shape[1], n = x.shape[2];
        var q = c_q.forward(x);
        var k = c_k.forward(x);
        var v = c_v.forward(x);
        var attn = (q.matmul(k.transpose(-2, -1)) * normFact).softmax(-1);
        var y = attn.matmul(v).transpose(1, 2).reshape(b, c, n);
        return scope.MoveToOuter(y + x);
    }
}

/// <summary>
/// Everything one MANIQA evaluation computes, for parity checks and notebooks. Tensors are those of the whole batch
/// (crops stacked crop-major per image: row b·crops + k); all are owned by the caller.
/// </summary>
/// <param name="Resized">The normalised input ((x − 0.5)/0.5), resized when min(H, W) ≤ 224: [B, 3, H', W'].</param>
/// <param name="CropOffsets">(top, left) of every crop in <paramref name="Resized"/>: int64 [crops, 2].</param>
/// <param name="Crops">[B·crops, 3, 224, 224].</param>
/// <param name="Vit6">Output of ViT block 6 (class token first): [B·crops, 1 + T², E].</param>
/// <param name="Vit9">Output of ViT block 9, likewise.</param>
/// <param name="Tab1">After the last stage-1 TABlock: [B·crops, 4E, T²].</param>
/// <param name="Conv1">[B·crops, E, T, T].</param>
/// <param name="Swin1">[B·crops, E, T, T].</param>
/// <param name="Tab2">After the last stage-2 TABlock: [B·crops, E, T²].</param>
/// <param name="Swin2">[B·crops, E/2, T, T].</param>
/// <param name="PerPatchScore">fc_score of every token of every crop: [B, crops·T²·num_outputs].</param>
/// <param name="PerPatchWeight">fc_weight likewise.</param>
/// <param name="Score">Σ w·s / (Σ w + 1e-8) per image: [B, 1].</param>
public sealed record ManiqaTrace(
    Tensor Resized, Tensor CropOffsets, Tensor Crops, Tensor Vit6, Tensor Vit9, Tensor Tab1, Tensor Conv1, Tensor Swin1,
    Tensor Tab2, Tensor Swin2, Tensor PerPatchScore, Tensor PerPatchWeight, Tensor Score);

/// <summary>
/// pyiqa's MANIQA no-reference quality metric (pyiqa/archs/maniqa_arch.py at 01ae427f; CVPR-W 2022, NTIRE 2022 NR-IQA
/// winner): ViT-B/8 features of blocks 6..9 → TABlocks → 1×1 conv → Swin → TABlocks → 1×1 conv → Swin → per-token
/// score s and weight w → Σ w·s / (Σ w + 1e-8) over every token of all the image's crops. Field names are the
/// official state_dict keys, so the released checkpoints (ckpt_koniq10k.pt, ckpt_kadid10k.pt, MANIQA_PIPAL-*.pth)
/// load strictly. Inference only: dropout is the identity (the official metric runs in eval mode).
/// </summary>
public sealed class ManiqaMetric : nn.Module
{
    /// <summary>The crop side the official forward hard-codes (<c>uniform_crop(x, crop_size=224, ...)</c>).</summary>
    public const int CropSize = 224;
    /// <summary>The ViT blocks whose outputs (class token dropped) are concatenated into the 4E-wide features.</summary>
    public static readonly int[] FeatureBlocks = { 6, 7, 8, 9 };

    readonly VisionTransformer vit;
    readonly ModuleList<TABlock> tablock1, tablock2;
    readonly Conv2d conv1, conv2;
    readonly ManiqaSwinTransformer swintransformer1, swintransformer2;
    readonly Sequential fc_score, fc_weight;

    public ManiqaConfig Config { get; }

    public ManiqaMetric(ManiqaConfig config) : base("MANIQA")
    {
        config.Validate();
        Config = config;
        int e = config.EmbedDim, t = config.InputSize;
        vit = new VisionTransformer(config.Vit);
        tablock1 = new ModuleList<TABlock>();
        for (int i = 0; i < config.NumTab; i++) tablock1.Add(new TABlock(t * t));
        conv1 = nn.Conv2d(e * 4, e, 1, 1, 0);
        swintransformer1 = new ManiqaSwinTransformer(t, config.Depths, config.NumHeads, e, config.WindowSize, config.DimMlp, config.Scale);
        tablock2 = new ModuleList<TABlock>();
        for (int i = 0; i < config.NumTab; i++) tablock2.Add(new TABlock(t * t));
        conv2 = nn.Conv2d(e, e / 2, 1, 1, 0);
        swintransformer2 = new ManiqaSwinTransformer(t, config.Depths, config.NumHeads, e / 2, config.WindowSize, config.DimMlp, config.Scale);
        // Indices 2 are nn.Dropout in the official Sequential: the identity at inference.
        fc_score = nn.Sequential(("0", nn.Linear(e / 2, e / 2)), ("1", nn.ReLU()), ("2", nn.Identity()),
            ("3", nn.Linear(e / 2, config.NumOutputs)), ("4", nn.ReLU()));
        fc_weight = nn.Sequential(("0", nn.Linear(e / 2, e / 2)), ("1", nn.ReLU()), ("2", nn.Identity()),
            ("3", nn.Linear(e / 2, config.NumOutputs)), ("4", nn.Sigmoid()));
        RegisterComponents();
        eval();
    }

    /// <summary>Strict load of an official MANIQA state dict (keys <c>vit.*</c>, <c>tablock1.*</c>, ... as in the released checkpoints).</summary>
    public LoadReport LoadStateDict(IReadOnlyDictionary<string, Tensor> stateDict, bool strict = true, string sourceName = "state dict") =>
        StateDictLoader.Load(this, stateDict, strict, sourceName);

    /// <summary>
    /// MANIQA quality score, higher is better, exactly as pyiqa's <c>InferenceModel('maniqa')</c> computes it.
    /// </summary>
    /// <param name="x">float32 RGB images [N, 3, H, W] (or [N, 1, H, W] grey, broadcast to 3 channels by the
    /// normalisation as in the official code) with values in [0, 1]; any size: an image whose shorter side is ≤ 224 is
    /// first resized bilinearly by 225 / min(H, W), then 20 uniformly spaced 224×224 crops are taken.</param>
    /// <returns>[N, 1] scores (≈ 0..1 for the released checkpoints). Images are evaluated one at a time (20 crops
    /// each), which bounds memory and gives the same numbers as a batched official call.</returns>
    public Tensor Score(Tensor x)
    {
        CheckInput(x);
        using var _ = no_grad();
        var scores = new List<Tensor>();
        for (long i = 0; i < x.shape[0]; i++)
        {
            using var scope = NewDisposeScope();
            var crops = UniformCrop(Preprocess(x.narrow(0, i, 1)), CropSize, Config.TestSample).Crops;
            var (s, w) = PerPatch(crops, null);
            scores.Add(scope.MoveToOuter(Pool(s, w)));
        }
        var result = cat(scores, 0);
        foreach (var s in scores) s.Dispose();
        return result;
    }

    /// <summary>The score of <see cref="Score"/> with every intermediate kept (whole batch at once, as the official forward).</summary>
    public ManiqaTrace Trace(Tensor x)
    {
        CheckInput(x);
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var resized = Preprocess(x);
        var (crops, offsets) = UniformCrop(resized, CropSize, Config.TestSample);
        var kept = new Dictionary<string, Tensor>();
        var (s, w) = PerPatch(crops, kept);
        var score = Pool(s, w);
        var trace = new ManiqaTrace(resized, offsets, crops, kept["vit6"], kept["vit9"], kept["tab1"], kept["conv1"],
            kept["swin1"], kept["tab2"], kept["swin2"], s, w, score);
        foreach (var t in new[] { resized, offsets, crops, s, w, score }.Concat(kept.Values)) t.MoveToOuterDisposeScope();
        return trace;
    }

    /// <summary>pyiqa's input check: 4-D, 1 or 3 channels, values within [0, 1] (± 1e-6).</summary>
    static void CheckInput(Tensor x)
    {
        if (x.dim() != 4) throw new ArgumentException($"MANIQA: input must be [N, C, H, W], got [{string.Join(", ", x.shape)}]");
        if (x.shape[1] is not (1 or 3)) throw new ArgumentException($"MANIQA: input must be RGB or grey (1 or 3 channels), got {x.shape[1]}");
        if (x.dtype != ScalarType.Float32) throw new ArgumentException($"MANIQA: input must be float32, got {x.dtype}");
        using var mn = x.min();
        using var mx = x.max();
        double min = mn.item<float>(), max = mx.item<float>();
        if (!(min > -1e-6 && max < 1 + 1e-6))
            throw new ArgumentException($"MANIQA: input must be normalised to [0, 1], got min={min:F4}, max={max:F4}");
    }

    /// <summary>
    /// (x − 0.5) / 0.5 (IMAGENET_INCEPTION mean / std), then, when min(H, W) ≤ 224, <c>F.interpolate(scale_factor =
    /// 225 / min(H, W), mode='bilinear', align_corners=False)</c>: output floor(H·sf) × floor(W·sf), source coordinates
    /// from the given factor ((dst + 0.5)/sf − 0.5), as pyiqa's <c>uniform_crop</c> does.
    /// </summary>
    public static Tensor Preprocess(Tensor x)
    {
        using var scope = NewDisposeScope();
        var half = full(new long[] { 1, 3, 1, 1 }, 0.5f, dtype: x.dtype, device: x.device);
        var y = (x - half) / half;
        long h = y.shape[2], w = y.shape[3];
        if (Math.Min(h, w) <= CropSize)
        {
            double sf = (CropSize + 1) / (double)Math.Min(h, w);
            y = nn.functional.interpolate(y, scale_factor: new[] { sf, sf }, mode: InterpolationMode.Bilinear, align_corners: false);
        }
        return scope.MoveToOuter(y);
    }

    /// <summary>
    /// pyiqa <c>uniform_crop</c> offsets for an H×W image: step = (side − crop) // int(√n), offsets (i·step_h, j·step_w)
    /// for i, j &lt; ceil(√n) row-major, the first n kept. int64 [n, 2] of (top, left).
    /// </summary>
    public static long[,] CropOffsets(long h, long w, int cropSize, int cropNum)
    {
        if (h < cropSize || w < cropSize) throw new ArgumentException($"MANIQA: {h}×{w} is smaller than the {cropSize} crop");
        long stepH = (h - cropSize) / (long)Math.Sqrt(cropNum), stepW = (w - cropSize) / (long)Math.Sqrt(cropNum);
        int side = (int)Math.Ceiling(Math.Sqrt(cropNum));
        var offsets = new long[cropNum, 2];
        int k = 0;
        for (int i = 0; i < side && k < cropNum; i++)
            for (int j = 0; j < side && k < cropNum; j++, k++)
            {
                offsets[k, 0] = i * stepH;
                offsets[k, 1] = j * stepW;
            }
        return offsets;
    }

    /// <summary>
    /// pyiqa <c>uniform_crop</c> on an already resized batch (see <see cref="Preprocess"/>): [B·n, C, crop, crop], row
    /// b·n + k = crop k of image b; and the offsets as an int64 [n, 2] tensor.
    /// </summary>
    public static (Tensor Crops, Tensor Offsets) UniformCrop(Tensor x, int cropSize, int cropNum)
    {
        long b = x.shape[0], c = x.shape[1];
        var off = CropOffsets(x.shape[2], x.shape[3], cropSize, cropNum);
        using var scope = NewDisposeScope();
        var crops = new List<Tensor>();
        for (int k = 0; k < cropNum; k++)
            crops.Add(x.narrow(2, off[k, 0], cropSize).narrow(3, off[k, 1], cropSize));
        var stacked = stack(crops, 1).reshape(b * cropNum, c, cropSize, cropSize);
        var flat = new long[cropNum * 2];
        Buffer.BlockCopy(off, 0, flat, 0, flat.Length * sizeof(long));
        var offsets = tensor(flat, new long[] { cropNum, 2 });
        return (scope.MoveToOuter(stacked), scope.MoveToOuter(offsets));
    }

    /// <summary>Crops [B·n, 3, 224, 224] → per-token scores and weights [B, n·T²·num_outputs] each.</summary>
    (Tensor Score, Tensor Weight) PerPatch(Tensor crops, Dictionary<string, Tensor>? keep)
    {
        using var scope = NewDisposeScope();
        int t = Config.InputSize;
        long bsz = crops.shape[0] / Config.TestSample;
        var blocks = vit.BlockOutputs(crops, FeatureBlocks.Max());
        var x = cat(FeatureBlocks.Select(i => blocks[i].narrow(1, 1, blocks[i].shape[1] - 1)).ToArray(), 2);
        keep?.Add("vit6", blocks[6]);
        keep?.Add("vit9", blocks[9]);

        // stage 1: 'b (h w) c -> b c (h w)', TABlocks, 'b c (h w) -> b c h w', conv1, Swin
        x = x.transpose(1, 2).contiguous();
        foreach (var tab in tablock1) x = tab.forward(x);
        keep?.Add("tab1", x);
        x = conv1.forward(x.reshape(x.shape[0], x.shape[1], t, t));
        keep?.Add("conv1", x);
        x = swintransformer1.forward(x);
        keep?.Add("swin1", x);

        // stage 2
        x = x.reshape(x.shape[0], x.shape[1], (long)t * t);
        foreach (var tab in tablock2) x = tab.forward(x);
        keep?.Add("tab2", x);
        x = conv2.forward(x.reshape(x.shape[0], x.shape[1], t, t));
        x = swintransformer2.forward(x);
        keep?.Add("swin2", x);

        // 'b c h w -> b (h w) c', per-token heads
        var tokens = x.flatten(2).transpose(1, 2);
        var s = fc_score.forward(tokens).reshape(bsz, -1);
        var w = fc_weight.forward(tokens).reshape(bsz, -1);
        if (keep != null) foreach (var v in keep.Values) v.MoveToOuterDisposeScope();
        return (scope.MoveToOuter(s), scope.MoveToOuter(w));
    }

    /// <summary>Σ w·s / (Σ w + 1e-8) over all tokens of all crops of each image: [B, 1].</summary>
    static Tensor Pool(Tensor s, Tensor w)
    {
        using var scope = NewDisposeScope();
        var score = (w * s).sum(-1) / (w.sum(-1) + 1e-8);
        return scope.MoveToOuter(score.unsqueeze(1));
    }
}
