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
