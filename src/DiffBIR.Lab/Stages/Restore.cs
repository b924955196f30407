using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Stages;

/// <summary>
/// The restore stage (stage 1 of DiffBIR, the restoration module RM): I_RM = RM(I_LQ), a regression network that removes
/// the degradation (noise, blur, compression) and leaves the missing detail to the diffusion stage. Any
/// <c>nn.Module&lt;Tensor, Tensor&gt;</c> on RGB images in [0, 1], NCHW, fits: the official BSRNet (RRDBNet), SwinIR,
/// SCUNet, or a user's own cleaner. No resizing or padding happens here (the pipelines do that).
/// </summary>
public sealed class Restore
{
    /// <summary>The stage-1 network (official <c>bsrnet</c> / <c>swinir</c> / <c>scunet</c>); put in eval mode.</summary>
    public nn.Module<Tensor, Tensor> Cleaner { get; }

    public Restore(nn.Module<Tensor, Tensor> cleaner)
    {
        Cleaner = cleaner;
        Cleaner.eval();
    }

    /// <summary>I_RM for a low-quality image in [0, 1] (no gradient).</summary>
    public Tensor Apply(Tensor lowQuality)
    {
        using var _ = torch.no_grad();
        using var scope = torch.NewDisposeScope();
        return Cleaner.forward(lowQuality).MoveToOuterDisposeScope();
    }
}
