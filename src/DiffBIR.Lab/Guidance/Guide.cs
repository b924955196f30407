using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Guidance;

/// <summary>What one application of guidance did; <see cref="Scale"/> is the paper scale it used, s·f(t) (null when not applied).</summary>
public sealed record GuideResult(Tensor X0, bool Applied, double? Loss, double? GradientNorm)
{
    public double? Scale { get; init; }
}

/// <summary>
/// The "guide" stage: x̂₀ ← x̂₀ + Δ/c for every repeat, where Δ is the latent-space gradient of the guidance loss
/// (rgb space: g back-propagated through the differentiable decoder) and c = ∂x_next/∂x̂₀ of the sampler's update
/// (<see cref="Diffusion.ModelRequest.X0Coefficient"/>; the official v2.0.0 spaced sampler's
/// 1/posterior_mean_coef1 grad_rescale), so that the next state moves by exactly Δ. Defined on x̂₀ only, so every
/// sampler can use it. The target is the stage-1 restoration: RGB in [−1, 1] for <see cref="GuidanceSpace.Rgb"/>, or
/// (latent space) produced by <see cref="EncodeTarget"/> at every repeat — the official code re-encodes it with
/// posterior sampling each time; without an encoder the given target is used as the latent target.
/// </summary>
public sealed class Guide
{
    public RestorationGuidance Guidance { get; }
    public Tensor Target { get; }
    /// <summary>Differentiable latent → RGB [−1,1] (ControlLDM.vae_decode); required for rgb space.</summary>
    public Func<Tensor, Tensor>? Decode { get; init; }
    /// <summary>RGB target → latent target (ControlLDM.vae_encode, with sampling officially); latent space only.</summary>
    public Func<Tensor, Tensor>? EncodeTarget { get; init; }

    public Guide(RestorationGuidance guidance, Tensor target) { Guidance = guidance; Target = target; }

    /// <summary>Applies guidance to x̂₀ at model timestep t (returns x̂₀ unchanged outside the window or at scale 0).</summary>
    public GuideResult Apply(Tensor predX0, int t, double x0Coefficient = 1.0)
    {
        if (!Guidance.IsActive(t)) return new GuideResult(predX0, false, null, null);
        using var scope = torch.NewDisposeScope();
        // float32 reciprocal, as the official 1 / extract_into_tensor(posterior_mean_coef1, ...)
        float rescale = 1f / (float)x0Coefficient;
        var x0 = predX0;
        var losses = new List<double>();
        Tensor? total = null;
        for (int r = 0; r < Guidance.Repeat; r++)
        {
            Tensor delta;
            if (Guidance.Space == GuidanceSpace.Latent)
            {
                var target = EncodeTarget is null ? Target : EncodeTarget(Target);
                var (g, loss) = Guidance.Gradient(target, x0, t);
                losses.Add(loss); delta = g;
            }
            else
            {
                if (Decode is null) throw new InvalidOperationException("rgb-space guidance needs a Decode function (latent → RGB)");
                var x0rg = x0.detach().clone().requires_grad_(true);
                Tensor pred;
                using (var _ = torch.enable_grad()) pred = Decode(x0rg);
                var (g, loss) = Guidance.Gradient(Target, pred, t);
                losses.Add(loss);
                using (var _ = torch.enable_grad()) pred.backward(new[] { g });
                delta = x0rg.grad!.detach().clone();
            }
            total = total is null ? delta : total + delta;
            x0 = x0 + delta * rescale;
        }
        double norm = total!.norm().item<float>();
        return new GuideResult(x0.detach().MoveToOuterDisposeScope(), true, losses.Average(), norm) { Scale = Guidance.ScaleAt(t) };
    }
}
