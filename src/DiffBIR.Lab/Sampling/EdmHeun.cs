using DiffBIR.Lab.Diffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Sampling;

/// <summary>
/// Heun's second-order method (Karras et al. 2022, Algorithm 2; k-diffusion <c>sample_heun</c>): an Euler predictor
/// to σ_{i+1}, a second evaluation there, and the average slope; the last step (σ_{i+1} = 0) is plain Euler. Churn as
/// in <see cref="EdmEuler"/>. Guidance acts on the first evaluation of each step, as a shift of the step's
/// result with its first-order weight 1 − σ_{i+1}/σ̂: the predictor and the corrector's slope use the model's own
/// x̂₀ (a guided predictor feeds the shift through the corrector's slope, which reversed its sign on v2.1).
/// </summary>
public sealed class EdmHeun : EdmSampler
{
    public EdmHeun(NoiseSchedule schedule, SamplerOptions? options = null) : base(schedule, options) { }
    public override string Solver => "heun";

    /// <summary>
    /// The factor (σ₁ − σ₀)/(2σ₁) by which Heun's first step multiplies the change of the model's x̂₀ between its two
    /// evaluations (its update is the Euler step plus that factor times x̂₀(x, σ₀) − x̂₀(x₂, σ₁)). On the official σ
    /// schedule σ₀ = 10⁴, so it is −276 at 10 steps with the v2.1 schedule (docs/tiny-preset.md: the edm_heun outlier).
    /// </summary>
    public (double Factor, double Sigma0, double Sigma1) FirstStepFactor(int steps)
    {
        if (steps < 1) throw new ArgumentOutOfRangeException(nameof(steps), steps, "at least one step");
        var (s, _) = Schedule64(steps);
        return s.Length < 3 || s[1] <= 0 ? (0, s[0], 0) : ((s[1] - s[0]) / (2 * s[1]), s[0], s[1]);
    }

    /// <summary>A note for the run's record when <see cref="FirstStepFactor"/> is over 100 in size; else null.</summary>
    public string? FirstStepNote(int steps)
    {
        var (f, s0, s1) = FirstStepFactor(steps);
        return Math.Abs(f) <= 100 ? null : string.Create(System.Globalization.CultureInfo.InvariantCulture,
            $"[Sampler]: edm_heun's first step (σ {s0:G3} → {s1:G4}) multiplies the change of x̂₀ between its two model calls by {f:F0}; with few steps this can wreck the result (more steps, or a first-order EDM sampler; docs/tiny-preset.md)");
    }

    public override string? Advisory(int steps) => FirstStepNote(steps);

    protected override IEnumerable<ModelRequest> Solve(Edm e, Tensor x)
    {
        for (int i = 0; i < e.N; i++)
        {
            Tensor sigmaHat;
            (x, sigmaHat) = EdmEuler.Churn(e.Ctx, Options, x, e.S(i), e.N);
            yield return Denoise(e, x, sigmaHat, e.S(i + 1), i, true, sigmaHat);
            var denoised = e.Ctx.PredictedX0;
            var d = ToD(x, sigmaHat, denoised);
            Callback(e, x, denoised);
            var dt = e.S(i + 1) - sigmaHat;
            if (e.IsZero(e.S(i + 1)))
                x = x + d * dt;
            else
            {
                var shift = e.Ctx.GuidanceDelta;                         // null without guidance
                var dModel = shift is null ? d : ToD(x, sigmaHat, e.Ctx.ModelX0);
                var x2 = x + dModel * dt;
                yield return Denoise(e, x2, e.S(i + 1), e.S(i + 1), i, false, x, dModel, dt, shift, sigmaHat);
                var denoised2 = e.Ctx.PredictedX0;
                var d2 = ToD(x2, e.S(i + 1), denoised2);
                var dPrime = (dModel + d2) / 2;
                x = x + dPrime * dt;
                if (shift is not null) x = x + shift * (1 - e.S(i + 1) / sigmaHat);
            }
        }
        e.Ctx.Result = x;
    }
}
