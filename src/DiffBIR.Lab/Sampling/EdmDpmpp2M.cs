using DiffBIR.Lab.Diffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Sampling;

/// <summary>
/// DPM-Solver++(2M) (Lu et al. 2022; k-diffusion <c>sample_dpmpp_2m</c>): deterministic multistep exponential
/// integrator in t = −log σ; from the second step on, D is extrapolated with the previous one,
/// D' = (1 + 1/2r)·D_i − (1/2r)·D_{i−1}, r = h_{i−1}/h_i; the first and the last step are first order.
/// </summary>
public sealed class EdmDpmpp2M : EdmSampler
{
    public EdmDpmpp2M(NoiseSchedule schedule, SamplerOptions? options = null) : base(schedule, options) { }
    public override string Solver => "dpm++_2m";

    protected override IEnumerable<ModelRequest> Solve(Edm e, Tensor x)
    {
        static Tensor SigmaFn(Tensor t) => t.neg().exp();
        static Tensor TFn(Tensor s) => s.log().neg();
        Tensor? old = null;
        for (int i = 0; i < e.N; i++)
        {
            yield return Denoise(e, x, e.S(i), e.S(i + 1), i, true, old);
            var denoised = e.Ctx.PredictedX0;
            Callback(e, x, denoised);
            var t = TFn(e.S(i)); var tNext = TFn(e.S(i + 1));
            var h = tNext - t;
            if (old is null || e.IsZero(e.S(i + 1)))
                x = (SigmaFn(tNext) / SigmaFn(t)) * x - h.neg().expm1() * denoised;
            else
            {
                var hLast = t - TFn(e.S(i - 1));
                var r = hLast / h;
                var denoisedD = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old;
                x = (SigmaFn(tNext) / SigmaFn(t)) * x - h.neg().expm1() * denoisedD;
            }
            old = denoised;
        }
        e.Ctx.Result = x;
    }
}
