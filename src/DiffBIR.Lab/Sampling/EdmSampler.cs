using DiffBIR.Lab.Diffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Sampling;

/// <summary>
/// The k-diffusion family as DiffBIR wires it (official <c>EDMSampler</c>): σ-space samplers over a denoiser
/// D(x, σ) built from the discrete ε- or v-model (Karras et al. 2022, Table 1 preconditioning):
/// ε: D = x − σ·F(x/√(σ²+1), t);  v: D = x/(σ²+1) − σ/√(σ²+1)·F(x/√(σ²+1), t),
/// where t is the schedule timestep whose σ is nearest (argmin). Schedule: timesteps = linspace(999, 0, n,
/// endpoint=False).astype(int), σ = √((1 − ᾱ)/ᾱ) at those timesteps with ᾱ[first] forced to 1e-8 (σ_max = 10⁴ for
/// v2 and v2.1 alike), then σ = 0 appended; x_T is scaled by √(1 + σ_max²).
/// CFG mixes the two branches on D (official order), with the per-step rescaled scale where enabled, and never
/// skips the negative branch (the official check uses the default scale).
/// All σ arithmetic is done on float32 0-dim tensors, as the official code does with its float32 buffers.
/// Guidance: the guided x̂₀ replaces D, so d = (x − x̂₀)/σ and every later use of D (multistep history) is the
/// guided one. <see cref="ModelRequest.X0Coefficient"/> is 1 − σ_{i+1}/σ̂_i, the weight of D in a first-order step.
/// </summary>
public abstract class EdmSampler : Sampler
{
    protected EdmSampler(NoiseSchedule schedule, SamplerOptions? options) : base(schedule, options) { }

    /// <summary>The k-diffusion solver name after "edm_".</summary>
    public abstract string Solver { get; }
    public override string Name => "edm_" + Solver;

    public (double[] Sigmas, long[] Timesteps) Schedule64(int steps)
    {
        var ac = Schedule.AlphasCumprod();
        int T = ac.Length;
        // np.linspace(T-1, 0, steps, endpoint=False): start + i·step with step = −(T−1)/steps, then astype(int).
        double stepSize = (0.0 - (T - 1)) / steps;
        var ts = Enumerable.Range(0, steps).Select(i => (long)(i * stepSize + (T - 1))).ToArray();
        var a = ts.Select(t => ac[t]).ToArray();
        a[0] = 1e-8;
        var sig = a.Select(v => Math.Pow((1 - v) / v, 0.5)).Append(0.0).ToArray();
        return (sig, ts.Append(0L).ToArray());
    }

    public override IReadOnlyDictionary<string, Tensor> Buffers(int steps)
    {
        var (s, t) = Schedule64(steps);
        return new Dictionary<string, Tensor> { ["sigmas"] = F32(s), ["timesteps"] = torch.tensor(t, ScalarType.Int64) };
    }

    /// <summary>State shared by the solver loops: σ buffer, timesteps buffer, the run context.</summary>
    protected sealed class Edm
    {
        public required SamplerContext Ctx;
        public required Tensor Sigmas;      // float32 [n+1]
        public required Tensor Timesteps;   // int64 [n+1]
        public required Tensor OnesPerImage;   // ones [B] (k-diffusion s_in)
        public required EdmSampler Owner;
        public int N => (int)Sigmas.shape[0] - 1;
        public Tensor S(int i) => Sigmas[i];
        public bool IsZero(Tensor s) => s.item<float>() == 0f;
    }

    protected internal sealed override IEnumerable<ModelRequest> Run(SamplerContext ctx, Tensor xT, int steps)
    {
        var (s, t) = Schedule64(steps);
        var e = new Edm
        {
            Ctx = ctx, Owner = this,
            Sigmas = ctx.Persist(F32(s)),
            Timesteps = ctx.Persist(torch.tensor(t, ScalarType.Int64)),
            OnesPerImage = ctx.Persist(torch.ones(new[] { xT.shape[0] }, xT.dtype, xT.device)),
        };
        var x = xT * torch.sqrt(1.0 + e.Sigmas[0].pow(2.0));
        return Solve(e, x);
    }

    /// <summary>The solver loop (one k-diffusion sample_* function). Yields via <see cref="Denoise"/>; sets the result.</summary>
    protected abstract IEnumerable<ModelRequest> Solve(Edm e, Tensor x);

    /// <summary>
    /// The request for D(x, σ) (σ a 0-dim float32 tensor). <paramref name="sigmaNext"/> sets the x̂₀ coefficient.
    /// The answer (after CFG, in D space) is read back with <c>e.Ctx.PredictedX0</c>.
    /// </summary>
    protected ModelRequest Denoise(Edm e, Tensor x, Tensor sigma, Tensor? sigmaNext, int step, bool main, params Tensor?[] keep)
    {
        var sig = sigma * e.OnesPerImage;                                   // sigma * s_in, [B]
        Tensor cSkip, cOut, cIn;
        var s2p1 = sig.pow(2) + 1.0;
        if (Parameterization == Parameterization.Eps)
        {
            cSkip = torch.ones_like(sig); cOut = -sig; cIn = 1 / s2p1.pow(0.5);
        }
        else
        {
            cSkip = 1.0 / s2p1; cOut = -sig / s2p1.pow(0.5); cIn = 1.0 / s2p1.pow(0.5);
        }
        // c_noise → the timestep whose σ is nearest
        var idx = (sig - e.Sigmas.unsqueeze(1)).abs().argmin(0).view(sig.shape);
        var cNoise = e.Timesteps[idx];
        long t0 = cNoise[0].item<long>();
        double cfg = CfgDenoiser.ScaleAt(Options.CfgScale, Options.RescaleCfg, t0);
        var cInB = cIn.view(-1, 1, 1, 1); var cOutB = cOut.view(-1, 1, 1, 1); var cSkipB = cSkip.view(-1, 1, 1, 1);
        var xIn = x * cInB;
        double sH = sigma.item<float>(), sN = sigmaNext is null ? 0 : sigmaNext.item<float>();
        var r = new ModelRequest
        {
            X = xIn, State = x, T = cNoise, Step = step, IsFirstOfStep = main, Timestep = (int)t0, CfgScale = cfg,
            UseNegative = Options.CfgScale != 1.0,
            Batching = CfgBatching.Separate,
            ToMixingSpace = o => o * cOutB + x * cSkipB,
            ToX0 = d => d, FromX0 = x0 => x0,
            X0Coefficient = sH > 0 ? 1 - sN / sH : 1,
        };
        return e.Ctx.Issue(r, keep.Append(x).Append(cOutB).Append(cSkipB).ToArray());
    }

    /// <summary>k-diffusion to_d: (x − D)/σ.</summary>
    protected static Tensor ToD(Tensor x, Tensor sigma, Tensor denoised) => (x - denoised) / sigma;

    /// <summary>k-diffusion get_ancestral_step (σ tensors): σ_up = min(σ_to, η√(σ_to²(σ_from² − σ_to²)/σ_from²)),
    /// σ_down = √(σ_to² − σ_up²).</summary>
    protected static (Tensor Down, Tensor Up) AncestralStep(Tensor from, Tensor to, double eta)
    {
        if (eta == 0) return (to, torch.zeros_like(to));
        var upCand = eta * (to.pow(2) * (from.pow(2) - to.pow(2)) / from.pow(2)).pow(0.5);
        // Python's min(a, b) returns a unless b < a
        var up = upCand.item<float>() < to.item<float>() ? upCand : to;
        var down = (to.pow(2) - up.pow(2)).pow(0.5);
        return (down, up);
    }

    /// <summary>k-diffusion's BrownianTreeNoiseSampler as the fixtures' torchsde shim runs it: one normal n per call,
    /// returned as (−√Δ·n)/√Δ (the tree is built on [σ_min, σ_max] and queried from σ down to σ_next, which flips the
    /// sign). Without torchsde the draws are independent normals, not a Brownian bridge.</summary>
    protected static Tensor BrownianNoise(SamplerContext ctx, Tensor x, Tensor sigma, Tensor sigmaNext)
    {
        var lo = sigmaNext; var hi = sigma;                       // sorted: σ_next < σ
        var w = (hi - lo).sqrt() * ctx.RandnLike(x);               // shim: sqrt(tb − ta)·randn_like(w0)
        w = w * -1;                                               // self.sign · sign = 1 · (−1)
        return w / (sigmaNext - sigma).abs().sqrt();
    }

    protected void Callback(Edm e, Tensor x, Tensor denoised) { e.Ctx.Record(x); e.Ctx.Record(denoised); }
}
