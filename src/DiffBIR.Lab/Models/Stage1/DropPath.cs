using DiffBIR.Lab.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Models.Stage1;

/// <summary>
/// Stochastic depth (timm 0.9.16 <c>DropPath</c>, scale_by_keep=True): in training mode each sample's residual branch
/// is kept with probability keep = 1 − drop_prob and then divided by keep, i.e. x · mask / keep with mask of shape
/// [B, 1, …, 1]; identity in eval mode. The keep masks come from <see cref="Draws"/> (replayable) or, when it is null,
/// from torch's global generator as the official code does. No parameters, so no state-dict keys.
/// </summary>
public sealed class DropPath : nn.Module<Tensor, Tensor>
{
    /// <summary>The drop probability (a float32 value of the official <c>torch.linspace</c> rule, as a double).</summary>
    public double DropProb { get; }

    /// <summary>Where the keep masks come from in training mode (null: torch's global generator).</summary>
    public ITrainingDraws? Draws { get; set; }

    public DropPath(double dropProb) : base(nameof(DropPath))
    {
        if (dropProb < 0 || dropProb >= 1) throw new ArgumentException($"DropPath: drop probability {dropProb} is not in [0, 1)");
        DropProb = dropProb;
    }

    public override Tensor forward(Tensor x)
    {
        if (DropProb == 0 || !training) return x.alias();
        double keep = 1 - DropProb;
        var shape = new long[x.dim()];
        Array.Fill(shape, 1L);
        shape[0] = x.shape[0];
        using var mask = Draws is { } d
            ? d.Bernoulli(shape, keep, x.dtype, x.device, "DropPath keep mask")
            : empty(shape, x.dtype, x.device).bernoulli_(keep);
        using var scaled = mask.div(keep);
        return x * scaled;
    }

    /// <summary>Sets the draw source of every DropPath under <paramref name="root"/>.</summary>
    public static void SetDraws(nn.Module root, ITrainingDraws? draws)
    {
        foreach (var (_, m) in root.named_modules()) if (m is DropPath p) p.Draws = draws;
    }
}
