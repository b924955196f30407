using DiffBIR.Lab.Diffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Sampling;

/// <summary>
/// Ancestral DPM-2 (k-diffusion <c>sample_dpm_2_ancestral</c>): the midpoint step of <see cref="EdmDpm2"/> down to
/// σ_down, then noise of size σ_up. The noise is drawn only on midpoint steps (never when σ_down = 0), as officially.
/// </summary>
public sealed class EdmDpm2Ancestral : EdmSampler
{
    public EdmDpm2Ancestral(NoiseSchedule schedule, SamplerOptions? options = null) : base(schedule, options) { }
    public override string Solver => "dpm_2_a";

    protected override IEnumerable<ModelRequest> Solve(Edm e, Tensor x)
    {
        for (int i = 0; i < e.N; i++)
        {
            var (down, up) = AncestralStep(e.S(i), e.S(i + 1), Options.Eta);
            // the x̂₀ weight of this step is that of an Euler step to σ_down
            yield return Denoise(e, x, e.S(i), down, i, true, down, up);
            var denoised = e.Ctx.PredictedX0;
            Callback(e, x, denoised);
            var d = ToD(x, e.S(i), denoised);
            if (down.item<float>() == 0f)
            {
                var dt = down - e.S(i);
                x = x + d * dt;
            }
            else
            {
                var sigmaMid = e.S(i).log().lerp(down.log(), torch.tensor(0.5f, device: down.device)).exp();
                var dt1 = sigmaMid - e.S(i);
                var dt2 = down - e.S(i);
                var shift = e.Ctx.GuidanceDelta;                         // as in EdmDpm2
                var dModel = shift is null ? d : ToD(x, e.S(i), e.Ctx.ModelX0);
                var x2 = x + dModel * dt1;
                yield return Denoise(e, x2, sigmaMid, down, i, false, x, sigmaMid, dt2, up, shift, down);
                var denoised2 = e.Ctx.PredictedX0;
                var d2 = ToD(x2, sigmaMid, denoised2);
                x = x + d2 * dt2;
                if (shift is not null) x = x + shift * (1 - down / e.S(i));
                x = x + e.Ctx.RandnLike(x) * Options.SNoise * up;
            }
        }
        e.Ctx.Result = x;
    }
}
