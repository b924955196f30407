using DiffBIR.Lab.Diffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Sampling;

/// <summary>
/// Heun's second-order method (Karras et al. 2022, Algorithm 2; k-diffusion <c>sample_heun</c>): an Euler predictor
/// to σ_{i+1}, a second evaluation there, and the average slope; the last step (σ_{i+1} = 0) is plain Euler. Churn as
/// in <see cref="EdmEuler"/>. Guidance acts on the first evaluation of each step.
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
                var x2 = x + d * dt;
                yield return Denoise(e, x2, e.S(i + 1), e.S(i + 1), i, false, x, d, dt);
                var denoised2 = e.Ctx.PredictedX0;
                var d2 = ToD(x2, e.S(i + 1), denoised2);
                var dPrime = (d + d2) / 2;
                x = x + dPrime * dt;
            }
        }
        e.Ctx.Result = x;
    }
}
