using DiffBIR.Lab.Models.Stage1;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Pipeline;

/// <summary>Which stage-1 network removes the degradations (official pipeline classes).</summary>
public enum CleanerKind
{
    /// <summary>BSRNet (RRDBNet ×4): <c>BSRNetPipeline</c>, v2 super-resolution.</summary>
    BSRNet,
    /// <summary>SwinIR: <c>SwinIRPipeline</c>, v1 / v2.1 and every face task.</summary>
    SwinIR,
    /// <summary>SCUNet-PSNR: <c>SCUNetPipeline</c>, v2 denoising.</summary>
    SCUNet,
}

/// <summary>
/// Stage 1 of DiffBIR, "restore": the cleaner network plus the official resizing around it (<c>apply_cleaner</c> of
/// each pipeline class), producing the condition image I_reg in [0, 1] with short edge ≥ 512. Tiling uses
/// <see cref="Tiling.Apply"/> (official <c>make_tiled_fn</c>, gaussian weights) and switches itself off when the
/// input is smaller than a tile, as the official code does.
/// </summary>
public abstract class Cleaner : IDisposable
{
    public abstract CleanerKind Kind { get; }
    public nn.Module<Tensor, Tensor> Network { get; }

    protected Cleaner(nn.Module<Tensor, Tensor> network) { Network = network; network.eval(); }

    /// <summary>
    /// The smallest short edge of the condition image: 512 in the official code (SD 2.1 base works at 512 px; the
    /// pipeline asserts it). Only the tiny preset lowers it, so that random-weight smoke runs stay small.
    /// </summary>
    public int ConditionShortEdge { get; init; } = 512;

    /// <summary>The size of the final image for an input of h × w (official <c>set_output_size</c>).</summary>
    public virtual (long H, long W) OutputSize(long h, long w) => (h, w);

    /// <summary>Whether tiling stays on for this input (off when the input is smaller than a tile).</summary>
    public static bool TilingApplies(Tensor lq, bool tiled, int tileSize) =>
        tiled && !(lq.shape[2] < tileSize || lq.shape[3] < tileSize);

    /// <summary>lq in [0, 1], NCHW → condition image in [0, 1] (official <c>apply_cleaner</c>).</summary>
    public abstract Tensor Apply(Tensor lq, bool tiled, int tileSize, int tileStride);

    public void Dispose() => Network.Dispose();
}

/// <summary>
/// v2 super-resolution (official <c>BSRNetPipeline</c>): BSRNet ×4, then the short edge raised to 512 when the final
/// size H·s × W·s is below 512 (ignoring s), else a bicubic antialiased resize to exactly H·s × W·s.
/// </summary>
public sealed class BSRNetCleaner : Cleaner
{
    public override CleanerKind Kind => CleanerKind.BSRNet;
    /// <summary>Final upscale s (official <c>--upscale</c>, default 4).</summary>
    public double Upscale { get; }

    public BSRNetCleaner(RRDBNet network, double upscale) : base(network) => Upscale = upscale;

    public override (long H, long W) OutputSize(long h, long w) => ((long)(h * Upscale), (long)(w * Upscale));

    public override Tensor Apply(Tensor lq, bool tiled, int tileSize, int tileStride)
    {
        using var scope = torch.NewDisposeScope();
        var x4 = TilingApplies(lq, tiled, tileSize)
            ? Tiling.Apply(lq, (t, _) => Network.forward(t), tileSize, tileStride, scale: 4)
            : Network.forward(lq);
        var (oh, ow) = OutputSize(lq.shape[2], lq.shape[3]);
        var output = Math.Min(oh, ow) < ConditionShortEdge ? ImageOps.ResizeShortEdgeTo(x4, ConditionShortEdge) : ImageOps.ResizeBicubic(x4, oh, ow);
        return output.MoveToOuterDisposeScope();
    }
}

/// <summary>
/// SwinIR (official <c>SwinIRPipeline</c>, for an lq already bicubically upscaled by the loop): untiled, the input is
/// raised to short edge 512 first, padded to a multiple of 64 (the unshuffle needs 8 × window 8) and cropped after;
/// tiled (tiles a multiple of 64), the output is raised to short edge 512 afterwards.
/// </summary>
public sealed class SwinIRCleaner : Cleaner
{
    public override CleanerKind Kind => CleanerKind.SwinIR;
    public SwinIRCleaner(SwinIR network) : base(network) { }

    public override Tensor Apply(Tensor lq, bool tiled, int tileSize, int tileStride)
    {
        using var scope = torch.NewDisposeScope();
        bool tile = TilingApplies(lq, tiled, tileSize);
        if (tile && tileSize % 64 != 0) throw new ArgumentException($"SwinIR (cleaner) tile size must be a multiple of 64, got {tileSize}");
        Tensor output;
        if (!tile)
        {
            if (Math.Min(lq.shape[2], lq.shape[3]) < ConditionShortEdge) lq = ImageOps.ResizeShortEdgeTo(lq, ConditionShortEdge);
            long h0 = lq.shape[2], w0 = lq.shape[3];
            output = Network.forward(ImageOps.PadToMultiplesOf(lq, 64))[.., .., ..(int)h0, ..(int)w0];
        }
        else
        {
            output = Tiling.Apply(lq, (t, _) => Network.forward(t), tileSize, tileStride);
            if (Math.Min(output.shape[2], output.shape[3]) < ConditionShortEdge) output = ImageOps.ResizeShortEdgeTo(output, ConditionShortEdge);
        }
        return output.MoveToOuterDisposeScope();
    }
}

/// <summary>v2 denoising (official <c>SCUNetPipeline</c>): SCUNet (same size out), then short edge raised to 512 if needed.</summary>
public sealed class SCUNetCleaner : Cleaner
{
    public override CleanerKind Kind => CleanerKind.SCUNet;
    public SCUNetCleaner(SCUNet network) : base(network) { }

    public override Tensor Apply(Tensor lq, bool tiled, int tileSize, int tileStride)
    {
        using var scope = torch.NewDisposeScope();
        var output = TilingApplies(lq, tiled, tileSize)
            ? Tiling.Apply(lq, (t, _) => Network.forward(t), tileSize, tileStride)
            : Network.forward(lq);
        if (Math.Min(output.shape[2], output.shape[3]) < ConditionShortEdge) output = ImageOps.ResizeShortEdgeTo(output, ConditionShortEdge);
        return output.MoveToOuterDisposeScope();
    }
}
