using DiffBIR.Lab.Diffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Sampling;

/// <summary>
/// DPM-Solver-2-like midpoint steps (k-diffusion <c>sample_dpm_2</c>): σ_mid = exp(lerp(log σ̂, log σ_{i+1}, ½)), an
/// Euler half step to σ_mid, a second evaluation there, then the full step with the midpoint slope. Last step Euler.
/// Churn as in <see cref="EdmEuler"/>.
/// </summary>
public sealed class EdmDpm2 : EdmSampler
{
    public EdmDpm2(NoiseSchedule schedule, SamplerOptions? options = null) : base(schedule, options) { }
    public override string Solver => "dpm_2";

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
            if (e.IsZero(e.S(i + 1)))
            {
                var dt = e.S(i + 1) - sigmaHat;
                x = x + d * dt;
            }
            else
            {
                var sigmaMid = sigmaHat.log().lerp(e.S(i + 1).log(), torch.tensor(0.5f, device: sigmaHat.device)).exp();
                var dt1 = sigmaMid - sigmaHat;
                var dt2 = e.S(i + 1) - sigmaHat;
                // Guidance: the midpoint uses the model's own x̂₀ and the step's result is shifted with the
                // first-order weight 1 − σ_{i+1}/σ̂ (through the midpoint slope the shift would reverse its sign).
                var shift = e.Ctx.GuidanceDelta;
                var dModel = shift is null ? d : ToD(x, sigmaHat, e.Ctx.ModelX0);
                var x2 = x + dModel * dt1;
                yield return Denoise(e, x2, sigmaMid, e.S(i + 1), i, false, x, sigmaMid, dt2, shift, sigmaHat);
                var denoised2 = e.Ctx.PredictedX0;
                var d2 = ToD(x2, sigmaMid, denoised2);
                x = x + d2 * dt2;
                if (shift is not null) x = x + shift * (1 - e.S(i + 1) / sigmaHat);
            }
        }
        e.Ctx.Result = x;
    }
}
