using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace DiffBIR.Lab.Metrics.Musiq;

/// <summary>TF 'SAME' padding (pyiqa.matlab_utils.exact_padding_2d, mode 'same' = zeros).</summary>
internal static class SamePadding
{
    public static Tensor Pad(Tensor x, int kernel, int stride)
    {
        long h = x.shape[2], w = x.shape[3];
        long h2 = (h + stride - 1) / stride, w2 = (w + stride - 1) / stride;
        long padRow = (h2 - 1) * stride + kernel - h;
        long padCol = (w2 - 1) * stride + kernel - w;
        if (padRow == 0 && padCol == 0) return x.alias();
        return F.pad(x, new[] { padCol / 2, padCol - padCol / 2, padRow / 2, padRow - padRow / 2 }, PaddingModes.Constant, 0);
    }
}

/// <summary>GroupNorm(32, C, eps) with PyTorch's initial affine values (weight 1, bias 0).</summary>
internal static class GroupNorm32
{
    // TorchSharp 0.107's nn.GroupNorm leaves its affine parameters uninitialised (seen: values up to 1e31); set them as
    // PyTorch does so that a model used before loading weights is at least finite.
    public static GroupNorm Create(long channels, double eps)
    {
        var gn = nn.GroupNorm(32, channels, eps: eps);
        using (no_grad())
        {
            gn.weight!.fill_(1);
            gn.bias!.fill_(0);
        }
        return gn;
    }
}

/// <summary>
/// Weight-standardised convolution (official <c>StdConv</c>, no bias): Ŵ = (W − mean W) / (std W + 1e-5) per output
/// channel over (in, kh, kw), std unbiased; TF 'SAME' zero padding.
/// </summary>
public sealed class StdConv : nn.Module<Tensor, Tensor>
{
    private readonly Parameter weight;
    private readonly int kernel, stride;

    public StdConv(int inChannels, int outChannels, int kernel, int stride) : base(nameof(StdConv))
    {
        this.kernel = kernel;
        this.stride = stride;
        weight = new Parameter(empty(outChannels, inChannels, kernel, kernel));
        nn.init.kaiming_uniform_(weight, Math.Sqrt(5));
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var padded = SamePadding.Pad(x, kernel, stride);
        var w = weight - weight.mean(new long[] { 1, 2, 3 }, keepdim: true);
        w = w / (w.std(new long[] { 1, 2, 3 }, unbiased: true, keepdim: true) + 1e-5);
        return F.conv2d(padded, w, null, strides: new long[] { stride, stride }).MoveToOuterDisposeScope();
    }
}

/// <summary>ResNet-v2-style bottleneck of the patch stem (official <c>Bottleneck</c>): 1×1, 3×3, 1×1 StdConv + GroupNorm(32, eps 1e-4), projection shortcut.</summary>
public sealed class MusiqBottleneck : nn.Module<Tensor, Tensor>
{
    private readonly StdConv conv1, conv2, conv3;
    private readonly GroupNorm gn1, gn2, gn3;
    private readonly StdConv? conv_proj;
    private readonly GroupNorm? gn_proj;

    public MusiqBottleneck(int inplanes, int outplanes, int stride = 1) : base("Bottleneck")
    {
        var width = inplanes;
        conv1 = new StdConv(inplanes, width, 1, 1);
        gn1 = GroupNorm32.Create(width, 1e-4);
        conv2 = new StdConv(width, width, 3, 1);
        gn2 = GroupNorm32.Create(width, 1e-4);
        conv3 = new StdConv(width, outplanes, 1, 1);
        gn3 = GroupNorm32.Create(outplanes, 1e-4);
        if (inplanes != outplanes || stride != 1)
        {
            conv_proj = new StdConv(inplanes, outplanes, 1, stride);
            gn_proj = GroupNorm32.Create(outplanes, 1e-4);
        }
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var identity = conv_proj is null ? x : gn_proj!.forward(conv_proj.forward(x));
        var y = F.relu(gn1.forward(conv1.forward(x)));
        y = F.relu(gn2.forward(conv2.forward(y)));
        y = gn3.forward(conv3.forward(y));
        return F.relu(y + identity).MoveToOuterDisposeScope();
    }
}

/// <summary>
/// Multi-head self-attention with a token mask (official <c>MultiHeadAttention</c>): logits where query or key is a
/// padding token are set to −1e3 (not −∞), so padded query rows attend almost uniformly — as the official code does.
/// </summary>
public sealed class MusiqMultiHeadAttention : nn.Module<Tensor, Tensor?, Tensor>
{
    private readonly Linear query, key, value, @out;
    private readonly int numHeads;
    private readonly double scale;

    public MusiqMultiHeadAttention(int dim, int numHeads) : base("MultiHeadAttention")
    {
        if (dim % numHeads != 0) throw new ArgumentException($"MUSIQ: hidden size {dim} is not divisible by {numHeads} heads");
        this.numHeads = numHeads;
        scale = Math.Pow(dim / numHeads, -0.5);
        query = nn.Linear(dim, dim);
        key = nn.Linear(dim, dim);
        value = nn.Linear(dim, dim);
        @out = nn.Linear(dim, dim);
        RegisterComponents();
    }

    /// <summary>x: [B, N, C]; mask: bool [B, N] (true = real token) or null.</summary>
    public override Tensor forward(Tensor x, Tensor? mask)
    {
        using var scope = NewDisposeScope();
        long b = x.shape[0], n = x.shape[1], c = x.shape[2];
        Tensor Heads(Tensor t) => t.reshape(b, n, numHeads, c / numHeads).permute(0, 2, 1, 3);
        var q = Heads(query.forward(x));
        var k = Heads(key.forward(x));
        var v = Heads(value.forward(x));
        var attn = q.matmul(k.transpose(-2, -1)) * scale;
        if (mask is not null)
        {
            var mask2d = mask.reshape(b, 1, n, 1).logical_and(mask.reshape(b, 1, 1, n));
            attn = attn.masked_fill(mask2d.logical_not(), -1e3);
        }
        attn = attn.softmax(-1);
        var y = attn.matmul(v).transpose(1, 2).reshape(b, n, c);
        return @out.forward(y).MoveToOuterDisposeScope();
    }
}

/// <summary>fc1 → exact (erf) GELU → fc2 (official <c>Mlp</c>).</summary>
public sealed class MusiqMlp : nn.Module<Tensor, Tensor>
{
    private readonly Linear fc1, fc2;

    public MusiqMlp(int inFeatures, int hiddenFeatures) : base("Mlp")
    {
        fc1 = nn.Linear(inFeatures, hiddenFeatures);
        fc2 = nn.Linear(hiddenFeatures, inFeatures);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var h = fc1.forward(x);
        using var a = F.gelu(h);
        return fc2.forward(a);
    }
}

/// <summary>Pre-norm transformer block (official <c>TransformerBlock</c>; LayerNorm eps 1e-6).</summary>
public sealed class MusiqTransformerBlock : nn.Module<Tensor, Tensor?, Tensor>
{
    private readonly LayerNorm norm1, norm2;
    private readonly MusiqMultiHeadAttention attention;
    private readonly MusiqMlp mlp;

    public MusiqTransformerBlock(int dim, int mlpDim, int numHeads) : base("TransformerBlock")
    {
        norm1 = nn.LayerNorm(dim, eps: 1e-6);
        attention = new MusiqMultiHeadAttention(dim, numHeads);
        norm2 = nn.LayerNorm(dim, eps: 1e-6);
        mlp = new MusiqMlp(dim, mlpDim);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x, Tensor? mask)
    {
        using var scope = NewDisposeScope();
        x = x + attention.forward(norm1.forward(x), mask);
        x = x + mlp.forward(norm2.forward(x));
        return x.MoveToOuterDisposeScope();
    }
}

/// <summary>Learned embeddings of the G×G hashed spatial positions (official <c>AddHashSpatialPositionEmbs</c>).</summary>
public sealed class AddHashSpatialPositionEmbs : nn.Module<Tensor, Tensor, Tensor>
{
    private readonly Parameter position_emb;

    public AddHashSpatialPositionEmbs(int gridSize, int dim) : base(nameof(AddHashSpatialPositionEmbs))
    {
        position_emb = new Parameter(empty(1, gridSize * gridSize, dim));
        nn.init.normal_(position_emb, std: 0.02);
        RegisterComponents();
    }

    /// <summary>inputs [B, N, D] + position_emb[positions] (positions [B, N], any numeric dtype, truncated to int64).</summary>
    public override Tensor forward(Tensor inputs, Tensor positions) => inputs + Gather(position_emb.squeeze(0), positions);

    internal static Tensor Gather(Tensor table, Tensor positions)
    {
        using var idx = positions.to_type(ScalarType.Int64);
        using var flat = table.index_select(0, idx.reshape(-1));
        return flat.reshape(positions.shape[0], positions.shape[1], table.shape[1]);
    }
}

/// <summary>Learned embedding of each scale id (official <c>AddScaleEmbs</c>).</summary>
public sealed class AddScaleEmbs : nn.Module<Tensor, Tensor, Tensor>
{
    private readonly Parameter scale_emb;

    public AddScaleEmbs(int numScales, int dim) : base(nameof(AddScaleEmbs))
    {
        scale_emb = new Parameter(empty(numScales, dim));
        nn.init.normal_(scale_emb, std: 0.02);
        RegisterComponents();
    }

    public override Tensor forward(Tensor inputs, Tensor scales) => inputs + AddHashSpatialPositionEmbs.Gather(scale_emb, scales);
}

/// <summary>
/// MUSIQ's transformer encoder (official <c>TransformerEncoder</c>): + hashed spatial and scale embeddings, a
/// learned [CLS] token prepended (mask 1), pre-norm blocks, final LayerNorm (eps 1e-6).
/// </summary>
public sealed class MusiqTransformerEncoder : nn.Module
{
    private readonly AddHashSpatialPositionEmbs posembed_input;
    private readonly AddScaleEmbs scaleembed_input;
    private readonly Parameter cls;
    private readonly LayerNorm encoder_norm;
    private readonly ModuleDict<MusiqTransformerBlock> transformer;
    private readonly bool useScaleEmb;

    public MusiqTransformerEncoder(int dim, int mlpDim, int numHeads, int numLayers, int numScales, int gridSize, bool useScaleEmb)
        : base("TransformerEncoder")
    {
        this.useScaleEmb = useScaleEmb;
        posembed_input = new AddHashSpatialPositionEmbs(gridSize, dim);
        scaleembed_input = new AddScaleEmbs(numScales, dim);
        cls = new Parameter(zeros(1, 1, dim));
        encoder_norm = nn.LayerNorm(dim, eps: 1e-6);
        transformer = new ModuleDict<MusiqTransformerBlock>();
        for (int i = 0; i < numLayers; i++) transformer.Add($"encoderblock_{i}", new MusiqTransformerBlock(dim, mlpDim, numHeads));
        RegisterComponents();
    }

    /// <summary>x: tokens [N, L, D]; spatial / scale positions [N, L]; masks bool [N, L]. Returns [N, L+1, D].</summary>
    public Tensor forward(Tensor x, Tensor spatialPositions, Tensor scalePositions, Tensor masks)
    {
        using var scope = NewDisposeScope();
        long n = x.shape[0];
        x = posembed_input.forward(x, spatialPositions);
        if (useScaleEmb) x = scaleembed_input.forward(x, scalePositions);
        x = cat(new[] { cls.repeat(n, 1, 1), x }, 1);
        var mask = cat(new[] { ones(n, 1, dtype: ScalarType.Bool, device: masks.device), masks }, 1);
        foreach (var (_, block) in transformer) x = block.forward(x, mask);
        return encoder_norm.forward(x).MoveToOuterDisposeScope();
    }
}
