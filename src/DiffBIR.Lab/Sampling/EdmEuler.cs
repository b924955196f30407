using DiffBIR.Lab.Diffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Sampling;

/// <summary>
/// Euler steps with optional churn (Karras et al. 2022, Algorithm 2; k-diffusion <c>sample_euler</c>):
/// γ = min(s_churn/n, √2 − 1) while s_tmin ≤ σ_i ≤ s_tmax, σ̂ = σ_i(1 + γ), x ← x + √(σ̂² − σ_i²)·s_noise·z,
/// then x ← x + (x − D(x, σ̂))/σ̂ · (σ_{i+1} − σ̂). A normal is drawn every step, even when γ = 0 (official).
/// </summary>
public sealed class EdmEuler : EdmSampler
{
    public EdmEuler(NoiseSchedule schedule, SamplerOptions? options = null) : base(schedule, options) { }
    public override string Solver => "euler";

    /// <summary>Shared by euler / heun / dpm_2: the churn of step i → (x, σ̂).</summary>
    internal static (Tensor X, Tensor SigmaHat) Churn(SamplerContext ctx, SamplerOptions o, Tensor x, Tensor sigma, int n)
    {
        float s = sigma.item<float>();
        double gamma = o.STmin <= s && s <= o.STmax ? Math.Min(o.SChurn / n, Math.Pow(2, 0.5) - 1) : 0.0;
        var eps = ctx.RandnLike(x) * o.SNoise;
        var sigmaHat = sigma * (gamma + 1);
        if (gamma > 0) x = x + eps * (sigmaHat.pow(2) - sigma.pow(2)).pow(0.5);
        return (x, sigmaHat);
    }

    protected override IEnumerable<ModelRequest> Solve(Edm e, Tensor x)
    {
        for (int i = 0; i < e.N; i++)
        {
            Tensor sigmaHat;
            (x, sigmaHat) = Churn(e.Ctx, Options, x, e.S(i), e.N);
            yield return Denoise(e, x, sigmaHat, e.S(i + 1), i, true, sigmaHat);
            var denoised = e.Ctx.PredictedX0;
            var d = ToD(x, sigmaHat, denoised);
            Callback(e, x, denoised);
            var dt = e.S(i + 1) - sigmaHat;
            x = x + d * dt;
        }
        e.Ctx.Result = x;
    }
}
