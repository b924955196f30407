using DiffBIR.Lab.Diffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Sampling;

/// <summary>
/// DPM-Solver++(3M) SDE (k-diffusion <c>sample_dpmpp_3m_sde</c>; the official inference default): exponential
/// integrator with h_η = h(η + 1), second/third-order corrections from the last two D's (φ₂, φ₃), and Brownian noise
/// σ_{i+1}·√(1 − e^{−2ηh})·s_noise. The last step returns D itself.
/// </summary>
public sealed class EdmDpmpp3MSde : EdmSampler
{
    public EdmDpmpp3MSde(NoiseSchedule schedule, SamplerOptions? options = null) : base(schedule, options) { }
    public override string Solver => "dpm++_3m_sde";

    protected override IEnumerable<ModelRequest> Solve(Edm e, Tensor x)
    {
        double eta = Options.Eta, sNoise = Options.SNoise;
        Tensor? d1Prev = null, d2Prev = null, h1 = null, h2 = null, h = null;
        for (int i = 0; i < e.N; i++)
        {
            yield return Denoise(e, x, e.S(i), e.S(i + 1), i, true, d1Prev, d2Prev, h1, h2, h);
            var denoised = e.Ctx.PredictedX0;
            Callback(e, x, denoised);
            if (e.IsZero(e.S(i + 1)))
                x = denoised;
            else
            {
                var t = e.S(i).log().neg(); var s = e.S(i + 1).log().neg();
                h = s - t;
                var hEta = h * (eta + 1);
                x = torch.exp(hEta.neg()) * x + hEta.neg().expm1().neg() * denoised;
                if (h2 is not null)
                {
                    var r0 = h1! / h; var r1 = h2 / h;
                    var d10 = (denoised - d1Prev!) / r0;
                    var d11 = (d1Prev! - d2Prev!) / r1;
                    var d1 = d10 + (d10 - d11) * r0 / (r0 + r1);
                    var d2 = (d10 - d11) / (r0 + r1);
                    var phi2 = hEta.neg().expm1() / hEta + 1;
                    var phi3 = phi2 / hEta - 0.5;
                    x = x + phi2 * d1 - phi3 * d2;
                }
                else if (h1 is not null)
                {
                    var r = h1 / h;
                    var d = (denoised - d1Prev!) / r;
                    var phi2 = hEta.neg().expm1() / hEta + 1;
                    x = x + phi2 * d;
                }
                if (eta != 0)
                    x = x + BrownianNoise(e.Ctx, x, e.S(i), e.S(i + 1)) * e.S(i + 1) * (-2 * h * eta).expm1().neg().sqrt() * sNoise;
            }
            (d1Prev, d2Prev) = (denoised, d1Prev);
            (h1, h2) = (h, h1);
        }
        e.Ctx.Result = x;
    }
}
