using DiffBIR.Lab.Diffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Sampling;

/// <summary>
/// Ancestral Euler (k-diffusion <c>sample_euler_ancestral</c>): step deterministically to σ_down, then add fresh noise
/// of size σ_up (get_ancestral_step with η), except at the last step.
/// </summary>
public sealed class EdmEulerAncestral : EdmSampler
{
    public EdmEulerAncestral(NoiseSchedule schedule, SamplerOptions? options = null) : base(schedule, options) { }
    public override string Solver => "euler_a";

    protected override IEnumerable<ModelRequest> Solve(Edm e, Tensor x)
    {
        for (int i = 0; i < e.N; i++)
        {
            yield return Denoise(e, x, e.S(i), e.S(i + 1), i, true);
            var denoised = e.Ctx.PredictedX0;
            var (down, up) = AncestralStep(e.S(i), e.S(i + 1), Options.Eta);
            Callback(e, x, denoised);
            var d = ToD(x, e.S(i), denoised);
            var dt = down - e.S(i);
            x = x + d * dt;
            if (e.S(i + 1).item<float>() > 0)
                x = x + e.Ctx.RandnLike(x) * Options.SNoise * up;
        }
        e.Ctx.Result = x;
    }
}
