using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Guidance;

/// <summary>Where the guidance loss is measured: on the decoded image (official default for the paper) or on the latent.</summary>
public enum GuidanceSpace { Rgb, Latent }

/// <summary>
/// Restoration guidance (paper §3.3; official <c>diffbir/utils/cond_fn.py</c>, after GDP): a loss L(x̂₀, target)
/// between the predicted clean image and the stage-1 restoration, whose gradient nudges x̂₀ at every step of the
/// window. Conventions kept from the official code: the scale s is stored as s·3000 (official <c>internal_scale</c>),
/// g = −∂L/∂pred · s·3000, the loss is Σ_batch mean_CHW(·) (so the effective step shrinks with the image size), the
/// window is t_stop &lt; t+1 &lt; t_start (strict, with the model timestep t), and the update repeats
/// <see cref="Repeat"/> times. Beyond the official code: a per-timestep scale <see cref="Schedule"/>.
/// </summary>
public abstract class RestorationGuidance
{
    /// <summary>The paper's gradient scale s (official <c>g_scale</c>).</summary>
    public double Scale { get; init; } = 0.0;
    public int TStart { get; init; } = 1001;
    public int TStop { get; init; } = -1;
    public GuidanceSpace Space { get; init; } = GuidanceSpace.Rgb;
    public int Repeat { get; init; } = 1;
    /// <summary>A factor f(t) of <see cref="Scale"/> (t = model timestep, 999 … 0): s(t) = s · f(t). Null: f = 1.</summary>
    public GuidanceSchedule? Schedule { get; init; }

    /// <summary>The paper scale in effect at model timestep t: s · f(t).</summary>
    public double ScaleAt(int t) => Scale * (Schedule?.At(t) ?? 1.0);

    /// <summary>
    /// The guidance of the CLI's and the sweep's names: <paramref name="kind"/> none (null), mse or wmse; space rgb or
    /// latent; <paramref name="norm"/> a <see cref="WeightMapNorm"/> name (wmse only). The one place both build it.
    /// </summary>
    public static RestorationGuidance? Create(string kind, double scale, int tStart, int tStop, string space, int repeat,
                                              GuidanceSchedule? schedule, int patchSize, string norm)
    {
        if (kind == "none") return null;
        var sp = space == "latent" ? GuidanceSpace.Latent : GuidanceSpace.Rgb;
        return kind == "mse"
            ? new MseGuidance { Scale = scale, TStart = tStart, TStop = tStop, Space = sp, Repeat = repeat, Schedule = schedule }
            : new WeightedMseGuidance { Scale = scale, TStart = tStart, TStop = tStop, Space = sp, Repeat = repeat, Schedule = schedule, PatchSize = patchSize, Norm = WeightMapNorm.Parse(norm) };
    }

    /// <summary>Whether the window contains model timestep t (official: t_stop &lt; t+1 &lt; t_start).</summary>
    public bool IsActive(int t) { int tNow = t + 1; return TStop < tNow && tNow < TStart; }

    /// <summary>The differentiable loss, Σ_n mean_CHW(·).</summary>
    public abstract Tensor Loss(Tensor target, Tensor pred);

    /// <summary>(g, L): g = −∂L/∂pred · s(t)·3000, computed on detached copies (official <c>__call__</c>).</summary>
    public virtual (Tensor G, double Loss) Gradient(Tensor target, Tensor pred, int t)
    {
        using var scope = torch.NewDisposeScope();
        var p = pred.detach().clone().requires_grad_(true);
        var tg = target.detach().clone();
        Tensor loss;
        using (var _ = torch.enable_grad()) loss = Loss(tg, p);
        var grad = torch.autograd.grad(new[] { loss }, new[] { p })[0];
        var g = -grad * (ScaleAt(t) * 3000);
        double l = loss.item<float>();
        return (g.detach().MoveToOuterDisposeScope(), l);
    }
}

/// <summary>MSE guidance: L = Σ_n mean (x̂₀ − target)².</summary>
public sealed class MseGuidance : RestorationGuidance
{
    public override Tensor Loss(Tensor target, Tensor pred) => (pred - target).pow(2).mean(new long[] { 1, 2, 3 }).sum();
}

/// <summary>
/// Weighted MSE guidance (the paper's choice): L = Σ_n mean (x̂₀ − target)² ⊙ W with W = 1 − tanh(patch sum of Sobel
/// magnitudes of the target) (<see cref="GradientMap"/>; the map is computed without gradient on (target+1)/2), so
/// flat regions follow the stage-1 result and edges are left to the diffusion prior. <see cref="PatchSize"/> is the
/// gradient-map patch (official: 2); <see cref="Norm"/> how the patch statistic is normalised before tanh (official:
/// the patch sum; see <see cref="WeightMapNorm"/> for the alternatives).
/// </summary>
public sealed class WeightedMseGuidance : RestorationGuidance
{
    public int PatchSize { get; init; } = 2;
    /// <summary>The normalisation of the gradient map (default: the official patch sum).</summary>
    public WeightMapNorm Norm { get; init; } = WeightMapNorm.Sum;

    public Tensor Weight(Tensor target)
    {
        using var _ = torch.no_grad();
        return GradientMap.WeightMap((target + 1) / 2, PatchSize, Norm);
    }

    public override Tensor Loss(Tensor target, Tensor pred)
    {
        var w = Weight(target);
        return ((pred - target).pow(2) * w).mean(new long[] { 1, 2, 3 }).sum();
    }
}
