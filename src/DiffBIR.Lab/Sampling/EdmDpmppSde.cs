using DiffBIR.Lab.Diffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Sampling;

/// <summary>
/// DPM-Solver++ (stochastic, k-diffusion <c>sample_dpmpp_sde</c>, r = ½): two stochastic sub-steps per step, each
/// an exponential-integrator step to σ_down plus Brownian noise σ_up (see <see cref="EdmSampler.BrownianNoise"/>);
/// the second uses (1 − 1/2r)·D + (1/2r)·D₂. Last step Euler.
/// </summary>
public sealed class EdmDpmppSde : EdmSampler
{
    public EdmDpmppSde(NoiseSchedule schedule, SamplerOptions? options = null) : base(schedule, options) { }
    public override string Solver => "dpm++_sde";

    protected override IEnumerable<ModelRequest> Solve(Edm e, Tensor x)
    {
        static Tensor SigmaFn(Tensor t) => t.neg().exp();
        static Tensor TFn(Tensor s) => s.log().neg();
        const double r = 0.5;
        double eta = Options.Eta, sNoise = Options.SNoise;
        for (int i = 0; i < e.N; i++)
        {
            yield return Denoise(e, x, e.S(i), e.S(i + 1), i, true);
            var denoised = e.Ctx.PredictedX0;
            Callback(e, x, denoised);
            if (e.IsZero(e.S(i + 1)))
            {
                var d = ToD(x, e.S(i), denoised);
                var dt = e.S(i + 1) - e.S(i);
                x = x + d * dt;
            }
            else
            {
                var t = TFn(e.S(i)); var tNext = TFn(e.S(i + 1));
                var h = tNext - t;
                var s = t + h * r;
                double fac = 1 / (2 * r);
                var (sd, su) = AncestralStep(SigmaFn(t), SigmaFn(s), eta);
                var s_ = TFn(sd);
                var x2 = (SigmaFn(s_) / SigmaFn(t)) * x - (t - s_).expm1() * denoised;
                x2 = x2 + BrownianNoise(e.Ctx, x, SigmaFn(t), SigmaFn(s)) * sNoise * su;
                yield return Denoise(e, x2, SigmaFn(s), e.S(i + 1), i, false, x, t, tNext, denoised);
                var denoised2 = e.Ctx.PredictedX0;
                (sd, su) = AncestralStep(SigmaFn(t), SigmaFn(tNext), eta);
                var tNext_ = TFn(sd);
                var denoisedD = (1 - fac) * denoised + fac * denoised2;
                x = (SigmaFn(tNext_) / SigmaFn(t)) * x - (t - tNext_).expm1() * denoisedD;
                x = x + BrownianNoise(e.Ctx, x, SigmaFn(t), SigmaFn(tNext)) * sNoise * su;
            }
        }
        e.Ctx.Result = x;
    }
}
