using DiffBIR.Lab.Diffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Sampling;

/// <summary>
/// Ancestral DPM-Solver++(2S) (k-diffusion <c>sample_dpmpp_2s_ancestral</c>): in t = −log σ, a half step to
/// s = t + h/2 with the data prediction, a second evaluation there, the full exponential-integrator step to σ_down,
/// then noise of size σ_up (plain normals, not a Brownian tree). Last step Euler.
/// </summary>
public sealed class EdmDpmpp2SAncestral : EdmSampler
{
    public EdmDpmpp2SAncestral(NoiseSchedule schedule, SamplerOptions? options = null) : base(schedule, options) { }
    public override string Solver => "dpm++_2s_a";

    protected override IEnumerable<ModelRequest> Solve(Edm e, Tensor x)
    {
        static Tensor SigmaFn(Tensor t) => t.neg().exp();
        static Tensor TFn(Tensor s) => s.log().neg();
        for (int i = 0; i < e.N; i++)
        {
            yield return Denoise(e, x, e.S(i), e.S(i + 1), i, true);
            var denoised = e.Ctx.PredictedX0;
            var (down, up) = AncestralStep(e.S(i), e.S(i + 1), Options.Eta);
            Callback(e, x, denoised);
            if (down.item<float>() == 0f)
            {
                var d = ToD(x, e.S(i), denoised);
                var dt = down - e.S(i);
                x = x + d * dt;
            }
            else
            {
                var t = TFn(e.S(i)); var tNext = TFn(down);
                double r = 0.5;
                var h = tNext - t;
                var s = t + r * h;
                var x2 = (SigmaFn(s) / SigmaFn(t)) * x - (h.neg() * r).expm1() * denoised;
                yield return Denoise(e, x2, SigmaFn(s), down, i, false, x, t, tNext, h, up);
                var denoised2 = e.Ctx.PredictedX0;
                x = (SigmaFn(tNext) / SigmaFn(t)) * x - h.neg().expm1() * denoised2;
            }
            if (e.S(i + 1).item<float>() > 0)
                x = x + e.Ctx.RandnLike(x) * Options.SNoise * up;
        }
        e.Ctx.Result = x;
    }
}
