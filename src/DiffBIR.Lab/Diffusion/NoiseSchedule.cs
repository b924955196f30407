using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Diffusion;

/// <summary>What the network predicts: the noise ε (SD 2.1, DiffBIR v1/v2) or the velocity v (v2.1, zero-SNR).</summary>
public enum Parameterization { Eps, V }

/// <summary>
/// The discrete DDPM noise schedule of DiffBIR (official <c>diffbir.model.gaussian_diffusion.Diffusion</c>).
/// β_t = linspace(√β_start, √β_end, T)² (the "linear" schedule of LDM), computed in float64 like the official numpy
/// code; ᾱ_t = ∏(1 − β). With <see cref="ZeroTerminalSnr"/> (v2.1) √ᾱ is shifted and rescaled so that ᾱ_T = 0
/// exactly (Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1).
/// </summary>
public sealed record NoiseSchedule(
    double LinearStart = 0.00085,
    double LinearEnd = 0.012,
    int Timesteps = 1000,
    bool ZeroTerminalSnr = false,
    Parameterization Parameterization = Parameterization.Eps)
{
    /// <summary>DiffBIR v1 / v2 (SD 2.1 base, ε-prediction).</summary>
    public static NoiseSchedule V2 { get; } = new();
    /// <summary>DiffBIR v2.1 (zero terminal SNR, v-prediction).</summary>
    public static NoiseSchedule V2_1 { get; } = new(ZeroTerminalSnr: true, Parameterization: Parameterization.V);

    /// <summary>β_t, float64 [T].</summary>
    public double[] Betas()
    {
        var b = new double[Timesteps];
        double s0 = Math.Sqrt(LinearStart), s1 = Math.Sqrt(LinearEnd);
        double step = (s1 - s0) / (Timesteps - 1);
        int halfway = Timesteps / 2;
        for (int i = 0; i < Timesteps; i++)
        {
            // torch.linspace (float64): the first half counts up from start, the second half down from end.
            double x = i < halfway ? s0 + step * i : s1 - step * (Timesteps - i - 1);
            b[i] = x * x;
        }
        return ZeroTerminalSnr ? EnforceZeroTerminalSnr(b) : b;
    }

    static double[] EnforceZeroTerminalSnr(double[] betas)
    {
        int n = betas.Length;
        var sqrtBar = new double[n];
        double cum = 1;
        for (int i = 0; i < n; i++) { cum *= 1 - betas[i]; sqrtBar[i] = Math.Sqrt(cum); }
        double a0 = sqrtBar[0], aT = sqrtBar[n - 1];
        for (int i = 0; i < n; i++) sqrtBar[i] = (sqrtBar[i] - aT) * (a0 / (a0 - aT));
        var bar = sqrtBar.Select(x => x * x).ToArray();
        var result = new double[n];
        result[0] = 1 - bar[0];
        for (int i = 1; i < n; i++) result[i] = 1 - bar[i] / bar[i - 1];
        return result;
    }

    /// <summary>ᾱ_t = ∏_{s≤t}(1 − β_s), float64 [T].</summary>
    public double[] AlphasCumprod()
    {
        var b = Betas();
        var a = new double[b.Length];
        double cum = 1;
        for (int i = 0; i < b.Length; i++) { cum *= 1 - b[i]; a[i] = cum; }
        return a;
    }

    /// <summary>The two float32 buffers the official Diffusion module registers: √ᾱ and √(1 − ᾱ).</summary>
    public (Tensor SqrtAlphasCumprod, Tensor SqrtOneMinusAlphasCumprod) Buffers()
    {
        var a = AlphasCumprod();
        return (torch.tensor(a.Select(Math.Sqrt).ToArray(), ScalarType.Float64).to(ScalarType.Float32),
                torch.tensor(a.Select(x => Math.Sqrt(1 - x)).ToArray(), ScalarType.Float64).to(ScalarType.Float32));
    }

    /// <summary>q(x_t | x_0): x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, with the float32 buffers gathered per batch item.</summary>
    public Tensor QSample(Tensor x0, Tensor t, Tensor noise)
    {
        using var scope = torch.NewDisposeScope();
        var (sa, s1ma) = Buffers();
        return (Extract(sa, t, x0) * x0 + Extract(s1ma, t, x0) * noise).MoveToOuterDisposeScope();
    }

    /// <summary>The v target: v_t = √ᾱ_t ε − √(1 − ᾱ_t) x_0.</summary>
    public Tensor Velocity(Tensor x0, Tensor t, Tensor noise)
    {
        using var scope = torch.NewDisposeScope();
        var (sa, s1ma) = Buffers();
        return (Extract(sa, t, x0) * noise - Extract(s1ma, t, x0) * x0).MoveToOuterDisposeScope();
    }

    static Tensor Extract(Tensor buffer, Tensor t, Tensor like)
    {
        var shape = new long[like.dim()];
        Array.Fill(shape, 1L);
        shape[0] = t.shape[0];
        return buffer.to(like.device).index_select(0, t.to(ScalarType.Int64).to(like.device)).to(like.dtype).reshape(shape);
    }
}
