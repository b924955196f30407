using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Metrics.Lpips;

/// <summary>
/// LPIPS v0.1's input normalisation (official <c>ScalingLayer</c>): (x − shift) / scale with the ImageNet-like constants
/// of the original release, applied to images already mapped to [−1, 1]. Both are persistent buffers [1, 3, 1, 1].
/// </summary>
public sealed class ScalingLayer : nn.Module<Tensor, Tensor>
{
    private readonly Tensor shift, scale;

    public ScalingLayer() : base(nameof(ScalingLayer))
    {
        // torch.Tensor([...]) is float32: the buffers hold the float32-rounded constants.
        shift = torch.tensor(new float[] { -0.030f, -0.088f, -0.188f }).reshape(1, 3, 1, 1);
        scale = torch.tensor(new float[] { 0.458f, 0.448f, 0.450f }).reshape(1, 3, 1, 1);
        register_buffer("shift", shift);
        register_buffer("scale", scale);
    }

    public override Tensor forward(Tensor x)
    {
        using var centred = x - shift;
        return centred / scale;
    }
}

/// <summary>One learned LPIPS head (official <c>NetLinLayer</c>): Dropout (identity in eval) + 1×1 conv to one channel, no bias.</summary>
public sealed class NetLinLayer : nn.Module<Tensor, Tensor>
{
    private readonly Sequential model;

    public NetLinLayer(int channels, bool useDropout) : base(nameof(NetLinLayer))
    {
        var conv = nn.Conv2d(channels, 1, 1, bias: false);
        model = useDropout ? nn.Sequential(("0", nn.Dropout()), ("1", conv)) : nn.Sequential(("0", conv));
        RegisterComponents();
    }

    public override Tensor forward(Tensor x) => model.forward(x);
}

/// <summary>
/// Every intermediate of one LPIPS evaluation, in the official names (index 0 = reference <c>in0</c>, 1 = target
/// <c>in1</c>). Per layer k: <see cref="Feats0"/>[k] / <see cref="Feats1"/>[k] the raw trunk outputs,
/// <see cref="Diffs"/>[k] = (f̂0 − f̂1)² of the channel-normalised features, <see cref="Lins"/>[k] the head output
/// [N,1,h,w], <see cref="Res"/>[k] its spatial mean [N,1,1,1]; <see cref="Score"/> = Σk Res[k] as [N,1].
/// </summary>
public sealed record LpipsTrace(Tensor Scaled0, Tensor Scaled1, Tensor[] Feats0, Tensor[] Feats1, Tensor[] Diffs,
    Tensor[] Lins, Tensor[] Res, Tensor Score) : IDisposable
{
    public void Dispose()
    {
        foreach (var t in new[] { Scaled0, Scaled1, Score }.Concat(Feats0).Concat(Feats1).Concat(Diffs).Concat(Lins).Concat(Res))
            t.Dispose();
    }
}

/// <summary>
/// LPIPS (Zhang et al., CVPR 2018), exactly as pyiqa computes the metrics <c>lpips</c> (AlexNet) and <c>lpips-vgg</c>
/// (official <c>pyiqa.archs.lpips_arch.LPIPS</c>, v0.1, spatially averaged): d(x, x₀) = Σₖ mean_hw wₖ · (f̂ₖ(x) − f̂ₖ(x₀))²
/// with f̂ the trunk features normalised over channels, f / (‖f‖₂ + 1e-10). Lower is more similar.
/// </summary>
/// <remarks>
/// The state dict has the official keys: <c>scaling_layer.shift/scale</c> (constant buffers), <c>net.sliceK.&lt;i&gt;.*</c>
/// (torchvision trunk), <c>lin0..lin4.model.1.weight</c> and, for the same modules again, <c>lins.0..4.model.1.weight</c>
/// (the official <c>self.lins</c> is a ModuleList of the same heads). The released <c>LPIPS_v0.1_*.pth</c> files hold
/// only <c>lin0..lin4</c> and the trunk comes from torchvision's IMAGENET1K_V1 weights: load both with
/// <c>strict: false</c>, or one full state dict strictly.
/// </remarks>
public sealed class LpipsMetric : nn.Module<Tensor, Tensor, Tensor>
{
    private readonly ScalingLayer scaling_layer;
    private readonly LpipsTrunk net;
    private readonly NetLinLayer lin0, lin1, lin2, lin3, lin4;
    private readonly ModuleList<NetLinLayer> lins;

    public LpipsConfig Config { get; }

    /// <summary>Builds the network for a configuration (default: pyiqa's <c>lpips</c>, AlexNet v0.1), in eval mode.</summary>
    public LpipsMetric(LpipsConfig? config = null) : base("LPIPS")
    {
        Config = config ?? LpipsConfig.Alex;
        Config.Validate();
        scaling_layer = new ScalingLayer();
        net = new LpipsTrunk(Config.IsVgg);
        var ch = Config.Channels;
        lin0 = new NetLinLayer(ch[0], Config.UseDropout);
        lin1 = new NetLinLayer(ch[1], Config.UseDropout);
        lin2 = new NetLinLayer(ch[2], Config.UseDropout);
        lin3 = new NetLinLayer(ch[3], Config.UseDropout);
        lin4 = new NetLinLayer(ch[4], Config.UseDropout);
        lins = nn.ModuleList(lin0, lin1, lin2, lin3, lin4);
        RegisterComponents();
        eval(); // official eval_mode=True
    }

    /// <summary>
    /// LPIPS.forward(in1 = target, in0 = reference, normalize=True) with every intermediate kept. Inputs in [0, 1]
    /// (mapped to [−1, 1] with 2x − 1), NCHW; no input checks (see <see cref="Score"/>).
    /// </summary>
    public LpipsTrace Trace(Tensor target, Tensor reference)
    {
        using var scope = torch.NewDisposeScope();
        // Official order: normalize, then ScalingLayer (v0.1 only), trunk on in0 (reference) then in1 (target).
        var in0 = reference * 2 - 1;
        var in1 = target * 2 - 1;
        var scaled0 = Config.Version == "0.1" ? scaling_layer.forward(in0) : in0;
        var scaled1 = Config.Version == "0.1" ? scaling_layer.forward(in1) : in1;
        var outs0 = net.forward(scaled0);
        var outs1 = net.forward(scaled1);
        var heads = new[] { lin0, lin1, lin2, lin3, lin4 };
        var diffs = new Tensor[5];
        var linOut = new Tensor[5];
        var res = new Tensor[5];
        Tensor? val = null;
        for (int k = 0; k < 5; k++)
        {
            diffs[k] = (NormalizeTensor(outs0[k]) - NormalizeTensor(outs1[k])).pow(2);
            linOut[k] = heads[k].forward(diffs[k]);
            res[k] = linOut[k].mean(new long[] { 2, 3 }, keepdim: true);
            val = val is null ? res[k] : val + res[k];
        }
        var score = val!.squeeze(-1).squeeze(-1);
        var trace = new LpipsTrace(scaled0, scaled1, outs0, outs1, diffs, linOut, res, score);
        foreach (var t in new[] { scaled0, scaled1, score }.Concat(outs0).Concat(outs1).Concat(diffs).Concat(linOut).Concat(res))
            t.MoveToOuterDisposeScope();
        return trace;
    }

    /// <summary>Official <c>normalize_tensor</c>: f / (sqrt(Σ_c f²) + 1e-10), the eps added to the norm (not inside the sqrt).</summary>
    static Tensor NormalizeTensor(Tensor f)
    {
        using var sq = f.pow(2);
        using var sum = sq.sum(1, keepdim: true);
        using var norm = sum.sqrt();
        using var denom = norm + 1e-10;
        return f / denom;
    }

    /// <summary>LPIPS.forward(target, reference) → [N, 1] (differentiable; no input checks). See <see cref="Score"/>.</summary>
    public override Tensor forward(Tensor target, Tensor reference)
    {
        using var scope = torch.NewDisposeScope();
        using var trace = Trace(target, reference);
        return trace.Score.clone().MoveToOuterDisposeScope();
    }

    /// <summary>
    /// The LPIPS distance as pyiqa's <c>InferenceModel("lpips" | "lpips-vgg")(target, reference)</c> returns it:
    /// float [N, 1], lower = more similar (0 for identical images).
    /// </summary>
    /// <param name="x">The image to assess (pyiqa's <c>target</c>, LPIPS's <c>in1</c>): float NCHW RGB (or 1-channel
    /// gray, broadcast over the three channels as the official code does) in [0, 1] — pyiqa asserts
    /// −1e-6 &lt; x &lt; 1 + 1e-6 and so does this method. Any H, W ≥ <see cref="LpipsConfig.MinSide"/> (31 for
    /// AlexNet, 16 for VGG16); no resizing.</param>
    /// <param name="reference">The reference image (<c>in0</c>), same H × W; same batch size as x, or 1 (broadcast).</param>
    /// <remarks>Runs without gradients, in the dtype and on the device of the weights.</remarks>
    public Tensor Score(Tensor x, Tensor reference)
    {
        CheckInput(x, "x");
        CheckInput(reference, "reference");
        if (x.shape[2] != reference.shape[2] || x.shape[3] != reference.shape[3])
            throw new ArgumentException($"LPIPS: x is {x.shape[2]}×{x.shape[3]} but the reference is {reference.shape[2]}×{reference.shape[3]}; "
                                        + "both images must have the same size");
        if (x.shape[0] != reference.shape[0] && x.shape[0] != 1 && reference.shape[0] != 1)
            throw new ArgumentException($"LPIPS: batch sizes {x.shape[0]} (x) and {reference.shape[0]} (reference) differ and neither is 1");
        if (Math.Min(x.shape[2], x.shape[3]) < Config.MinSide)
            throw new ArgumentException($"LPIPS ({Config.Net}): images of {x.shape[2]}×{x.shape[3]} are too small; "
                                        + $"the trunk needs height and width ≥ {Config.MinSide}");
        using var scope = torch.NewDisposeScope();
        using var _ = torch.no_grad();
        var w = parameters().First();
        var score = forward(x.to(w.dtype, w.device), reference.to(w.dtype, w.device));
        return score.MoveToOuterDisposeScope();
    }

    static void CheckInput(Tensor t, string name)
    {
        if (t.dim() != 4) throw new ArgumentException($"LPIPS: {name} must be a 4-D tensor (N, C, H, W), got [{string.Join(", ", t.shape)}]");
        if (t.shape[1] is not (1 or 3)) throw new ArgumentException($"LPIPS: {name} must have 1 or 3 channels, got {t.shape[1]}");
        if (!t.is_floating_point()) throw new ArgumentException($"LPIPS: {name} must be a float tensor in [0, 1], got {t.dtype}");
        const double eps = 1e-6; // pyiqa InferenceModel.is_valid_input
        using var tmin = t.min().to_type(ScalarType.Float64);
        using var tmax = t.max().to_type(ScalarType.Float64);
        double min = tmin.item<double>(), max = tmax.item<double>();
        if (!(min > -eps && max < 1 + eps))
            throw new ArgumentOutOfRangeException(name, $"LPIPS: input must be in [0, 1], got min={min:0.####}, max={max:0.####}");
    }
}
