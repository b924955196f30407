using DiffBIR.Lab.Models.Stage1;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Metrics.Maniqa;

/// <summary>
/// MANIQA's Swin block (pyiqa/archs/maniqa_swin.py <c>SwinBlock</c>): LayerNorm → (shifted) window attention →
/// residual, LayerNorm → MLP (hidden width <c>dim_mlp</c>) → residual, on a fixed T×T token grid. The window attention,
/// its relative-position bias and the shifted-window mask are the same maths as SwinIR's, so those parts are shared.
/// </summary>
public sealed class ManiqaSwinBlock : nn.Module<Tensor, Tensor>
{
    readonly LayerNorm norm1, norm2;
    readonly WindowAttention attn;
    readonly SwinMlp mlp;
    // Persistent buffer in the official code (so in the released checkpoints): the SW-MSA mask of the fixed grid with
    // −100 between regions, or absent for unshifted blocks.
    readonly Tensor? attn_mask;
    readonly int resolution, windowSize, shiftSize;

    public ManiqaSwinBlock(int dim, int resolution, int numHeads, int windowSize, int shiftSize, int dimMlp)
        : base("SwinBlock")
    {
        this.resolution = resolution;
        // As the official code: a grid no larger than one window is one unshifted window.
        if (resolution <= windowSize)
        {
            shiftSize = 0;
            windowSize = resolution;
        }
        if (shiftSize < 0 || shiftSize >= windowSize) throw new ArgumentException("MANIQA Swin: shift_size must be in [0, window_size)");
        if (resolution % windowSize != 0)
            throw new ArgumentException($"MANIQA Swin: token grid {resolution} is not a multiple of the window size {windowSize}");
        this.windowSize = windowSize;
        this.shiftSize = shiftSize;
        norm1 = nn.LayerNorm(dim);
        attn = new WindowAttention(dim, windowSize, numHeads);
        norm2 = nn.LayerNorm(dim);
        mlp = new SwinMlp(dim, dimMlp);
        attn_mask = shiftSize > 0 ? SwinTransformerBlock.CalculateMask(resolution, resolution, windowSize, shiftSize, null) : null;
        RegisterComponents();
    }

    /// <summary>x: [B, T·T, C] tokens of the T×T grid.</summary>
    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        long b = x.shape[0], l = x.shape[1], c = x.shape[2];
        if (l != (long)resolution * resolution) throw new ArgumentException($"MANIQA Swin: {l} tokens, expected {resolution}×{resolution}");
        var t = norm1.forward(x).view(b, resolution, resolution, c);
        if (shiftSize > 0) t = t.roll(new long[] { -shiftSize, -shiftSize }, new long[] { 1, 2 });
        var xw = SwinTransformerBlock.WindowPartition(t, windowSize).view(-1, windowSize * windowSize, c);
        var aw = attn.forward(xw, attn_mask).view(-1, windowSize, windowSize, c);
        t = SwinTransformerBlock.WindowReverse(aw, windowSize, resolution, resolution);
        if (shiftSize > 0) t = t.roll(new long[] { shiftSize, shiftSize }, new long[] { 1, 2 });
        var y = x + t.view(b, (long)resolution * resolution, c);
        y = y + mlp.forward(norm2.forward(y));
        return scope.MoveToOuter(y);
    }
}

/// <summary>
/// MANIQA's <c>BasicLayer</c>: <c>depth</c> Swin blocks (shift 0 / window//2 alternating), then back to a T×T image,
/// 3×3 conv + ReLU, and back to tokens.
/// </summary>
public sealed class ManiqaSwinLayer : nn.Module<Tensor, Tensor>
{
    readonly Conv2d conv;
    readonly ModuleList<ManiqaSwinBlock> blocks;
    readonly int resolution;

    public ManiqaSwinLayer(int dim, int resolution, int depth, int numHeads, int windowSize, int dimMlp) : base("BasicLayer")
    {
        this.resolution = resolution;
        conv = nn.Conv2d(dim, dim, 3, 1, 1);
        blocks = new ModuleList<ManiqaSwinBlock>();
        for (int i = 0; i < depth; i++)
            blocks.Add(new ManiqaSwinBlock(dim, resolution, numHeads, windowSize, i % 2 == 0 ? 0 : windowSize / 2, dimMlp));
        RegisterComponents();
    }

    /// <summary>x: [B, T·T, C] → [B, T·T, C].</summary>
    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        foreach (var blk in blocks) x = blk.forward(x);
        var img = ManiqaSwinTransformer.TokensToImage(x, resolution);
        var y = nn.functional.relu(conv.forward(img));
        return scope.MoveToOuter(ManiqaSwinTransformer.ImageToTokens(y));
    }
}

/// <summary>
/// MANIQA's <c>SwinTransformer</c> (maniqa_swin.py): per layer x = scale·layer(x) + x, on [B, C, T, T] images.
/// <c>downsample</c> (3×3 stride-2 conv) is constructed and in the checkpoints but never used by the official forward.
/// </summary>
public sealed class ManiqaSwinTransformer : nn.Module<Tensor, Tensor>
{
    readonly Conv2d downsample;
    readonly ModuleList<ManiqaSwinLayer> layers;
    readonly int resolution;
    readonly double scale;

    public ManiqaSwinTransformer(int resolution, int[] depths, int[] numHeads, int embedDim, int windowSize, int dimMlp, double scale)
        : base("SwinTransformer")
    {
        this.resolution = resolution;
        this.scale = scale;
        downsample = nn.Conv2d(embedDim, embedDim, 3, stride: 2, padding: 1);
        layers = new ModuleList<ManiqaSwinLayer>();
        for (int i = 0; i < depths.Length; i++)
            layers.Add(new ManiqaSwinLayer(embedDim, resolution, depths[i], numHeads[i], windowSize, dimMlp));
        RegisterComponents();
    }

    /// <summary>x: [B, C, T, T] → [B, C, T, T].</summary>
    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var t = ImageToTokens(x);
        foreach (var layer in layers) t = layer.forward(t) * scale + t;
        return scope.MoveToOuter(TokensToImage(t, resolution));
    }

    /// <summary>'b c h w -> b (h w) c'.</summary>
    internal static Tensor ImageToTokens(Tensor x)
    {
        using var f = x.flatten(2);
        return f.transpose(1, 2).contiguous();
    }

    /// <summary>'b (h w) c -> b c h w' for an h = w = <paramref name="side"/> grid.</summary>
    internal static Tensor TokensToImage(Tensor x, long side)
    {
        using var t = x.transpose(1, 2);
        return t.reshape(x.shape[0], x.shape[2], side, side);
    }
}
