using DiffBIR.Lab.Diffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Sampling;

/// <summary>
/// DPM-Solver++(2M) SDE, midpoint variant (k-diffusion <c>sample_dpmpp_2m_sde</c>): the exponential integrator with
/// e^{−ηh} damping, a second-order correction from the previous D, and Brownian noise
/// σ_{i+1}·√(1 − e^{−2ηh})·s_noise (see <see cref="EdmSampler.BrownianNoise"/>). The last step returns D itself.
/// </summary>
public sealed class EdmDpmpp2MSde : EdmSampler
{
    public EdmDpmpp2MSde(NoiseSchedule schedule, SamplerOptions? options = null) : base(schedule, options) { }
    public override string Solver => "dpm++_2m_sde";

    protected override IEnumerable<ModelRequest> Solve(Edm e, Tensor x)
    {
        double eta = Options.Eta, sNoise = Options.SNoise;
        Tensor? old = null, hLast = null, h = null;
        for (int i = 0; i < e.N; i++)
        {
            yield return Denoise(e, x, e.S(i), e.S(i + 1), i, true, old, hLast, h);
            var denoised = e.Ctx.PredictedX0;
            Callback(e, x, denoised);
            if (e.IsZero(e.S(i + 1)))
                x = denoised;
            else
            {
                var t = e.S(i).log().neg(); var s = e.S(i + 1).log().neg();
                h = s - t;
                var etaH = eta * h;
                x = e.S(i + 1) / e.S(i) * etaH.neg().exp() * x + (h.neg() - etaH).expm1().neg() * denoised;
                if (old is not null)
                {
                    var r = hLast! / h;
                    x = x + 0.5 * (h.neg() - etaH).expm1().neg() * (1 / r) * (denoised - old);
                }
                if (eta != 0)
                    x = x + BrownianNoise(e.Ctx, x, e.S(i), e.S(i + 1)) * e.S(i + 1) * (-2 * etaH).expm1().neg().sqrt() * sNoise;
            }
            old = denoised;
            hLast = h;
        }
        e.Ctx.Result = x;
    }
}
