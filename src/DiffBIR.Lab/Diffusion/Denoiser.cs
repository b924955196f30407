using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Diffusion;

/// <summary>
/// What ControlLDM is conditioned on (official <c>cond</c> dict): the CLIP text tokens <c>c_txt</c> [N,77,ctx], the
/// VAE latent of the stage-1 output <c>c_img</c> [N,4,h,w], and the 13 ControlNet scales (official
/// <c>control_scales</c>, set to <c>[strength]*13</c> by the pipeline).
/// </summary>
public sealed record Conditioning(Tensor CText, Tensor CImage, IReadOnlyList<double>? ControlScales = null)
{
    /// <summary>Control strength s for every one of the 13 control outputs (official default 1).</summary>
    public static IReadOnlyList<double> Strength(double s) => Enumerable.Repeat(s, 13).ToArray();

    /// <summary>Both conditions stacked along the batch (DDIM / DPM-Solver evaluate the two CFG branches in one call).</summary>
    public static Conditioning Cat(Conditioning a, Conditioning b) =>
        new(torch.cat(new[] { a.CText, b.CText }), torch.cat(new[] { a.CImage, b.CImage }), a.ControlScales);
}

/// <summary>
/// The network call of the diffusion model (official <c>ControlLDM.forward(x, t, cond)</c>): noisy latent x_t,
/// timestep t (int64 for DDPM-style samplers, float32 continuous for DPM-Solver) and the conditioning → the model
/// output, ε or v depending on the <see cref="Parameterization"/>.
/// </summary>
public interface IDenoiser
{
    Tensor Forward(Tensor x, Tensor t, Conditioning cond);
}

/// <summary>How the two classifier-free-guidance branches are sent to the network (the official samplers differ).</summary>
public enum CfgBatching
{
    /// <summary>Two calls, positive then negative (Spaced, EDM).</summary>
    Separate,
    /// <summary>One call on [positive; negative] (DDIM).</summary>
    PositiveFirst,
    /// <summary>One call on [negative; positive] (DPM-Solver).</summary>
    NegativeFirst,
}

/// <summary>
/// One network evaluation a sampler needs: model input x (already scaled where the sampler scales it), model time t,
/// the CFG scale for this evaluation, and how to combine. <see cref="ToMixingSpace"/> maps each raw branch output into the
/// space where the official code mixes the branches (EDM: the denoised D(x, σ); DPM-Solver: ε); null = raw output.
/// <see cref="ToX0"/> turns the combined output into the predicted clean latent x̂₀ (for observers and guidance) and
/// <see cref="FromX0"/> maps a (guided) x̂₀ back to the combined-output space.
/// </summary>
public sealed class ModelRequest
{
    public required Tensor X { get; init; }
    public required Tensor T { get; init; }
    /// <summary>The sampler's state z_t this evaluation belongs to (X before any input scaling); defaults to X.</summary>
    public Tensor State { get => _state ?? X; init => _state = value; }
    Tensor? _state;
    /// <summary>Outer step index (0 = noisiest) this evaluation belongs to.</summary>
    public required int Step { get; init; }
    /// <summary>True for the first evaluation of a step (the one observers and guidance see).</summary>
    public bool IsFirstOfStep { get; init; } = true;
    /// <summary>The DDPM timestep (0..999) this evaluation stands for; guidance windows and schedules use it.</summary>
    public required int Timestep { get; init; }
    public required double CfgScale { get; init; }
    /// <summary>False where the official sampler skips the negative branch (scale exactly 1).</summary>
    public bool UseNegative { get; init; } = true;
    public CfgBatching Batching { get; init; } = CfgBatching.Separate;
    public Func<Tensor, Tensor>? ToMixingSpace { get; init; }
    public required Func<Tensor, Tensor> ToX0 { get; init; }
    public required Func<Tensor, Tensor> FromX0 { get; init; }
    /// <summary>∂x_next/∂x̂₀ of the step's update (the official v2.0.0 posterior_mean_coef1): guidance divides its
    /// gradient by it so that the state moves by exactly the gradient, as the official grad_rescale does.</summary>
    public double X0Coefficient { get; init; } = 1.0;
}

/// <summary>
/// Classifier-free guidance around a network: ε̃ = ε(x, c⁻) + s·(ε(x, c⁺) − ε(x, c⁻)) (Ho and Salimans, 2022), where
/// the positive and negative conditions share c_img and differ only in the text. The scale s of each evaluation
/// comes from the sampler's request (official <c>get_cfg_scale</c>, with <c>rescale_cfg</c>).
/// </summary>
public sealed class CfgDenoiser
{
    public IDenoiser Model { get; }
    public Conditioning Positive { get; }
    public Conditioning? Negative { get; }

    public CfgDenoiser(IDenoiser model, Conditioning positive, Conditioning? negative)
    {
        Model = model; Positive = positive; Negative = negative;
    }

    /// <summary>The combined output for one request (in the sampler's combination space, see <see cref="ModelRequest.ToMixingSpace"/>).</summary>
    public Tensor Predict(ModelRequest r)
    {
        using var scope = torch.NewDisposeScope();
        Func<Tensor, Tensor> br = r.ToMixingSpace ?? (o => o);
        Tensor result;
        if (Negative is null || !r.UseNegative)
            result = br(Model.Forward(r.X, r.T, Positive));
        else if (r.Batching == CfgBatching.Separate)
        {
            var pos = br(Model.Forward(r.X, r.T, Positive));
            var neg = br(Model.Forward(r.X, r.T, Negative));
            result = neg + r.CfgScale * (pos - neg);
        }
        else
        {
            bool posFirst = r.Batching == CfgBatching.PositiveFirst;
            var xIn = torch.cat(new[] { r.X, r.X });
            var tIn = torch.cat(new[] { r.T, r.T });
            var c = posFirst ? Conditioning.Cat(Positive, Negative) : Conditioning.Cat(Negative, Positive);
            var outs = br(Model.Forward(xIn, tIn, c)).chunk(2);
            var (pos, neg) = posFirst ? (outs[0], outs[1]) : (outs[1], outs[0]);
            result = neg + r.CfgScale * (pos - neg);
        }
        return result.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// The official rescaled CFG schedule (<c>Sampler.get_cfg_scale</c>, <c>rescale_cfg=True</c>):
    /// s(t) = 1 + s·(1 − cos(π((1000 − t)/1000)⁵))/2, which is exactly 1 at t = 999 and rises towards 1 + s at t = 0.
    /// Without rescaling (or s ≤ 1) the scale is s at every step.
    /// </summary>
    public static double ScaleAt(double cfgScale, bool rescale, double modelT)
    {
        if (!rescale || cfgScale <= 1) return cfgScale;
        return Rescaled(cfgScale, Math.PI * Math.Pow((1000 - modelT) / 1000, 5.0));
    }

    /// <summary>The rescaled-CFG formula itself, 1 + s·(1 − cos φ)/2 with φ = π((1000 − t)/1000)⁵ given by the caller
    /// (DPM-Solver computes φ from its float32 continuous time, as its official model_wrapper does).</summary>
    public static double Rescaled(double cfgScale, double phase) => 1 + cfgScale * ((1 - Math.Cos(phase)) / 2);
}
