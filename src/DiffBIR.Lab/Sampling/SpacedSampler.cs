using DiffBIR.Lab.Diffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Sampling;

/// <summary>
/// Respaced ancestral DDPM (official <c>SpacedSampler</c>, after guided-diffusion's respace.py): the N used timesteps
/// are spread evenly over 0..999 (<see cref="SpaceTimesteps"/>), a new β is derived so that ᾱ at the used timesteps
/// is unchanged, and each step samples the posterior q(x_{t−1} | x_t, x̂₀) = N(c₁ x̂₀ + c₂ x_t, σ̃²).
/// The network sees the original timesteps (999, 666, …); the buffers are indexed by the respaced index.
/// Guidance: a guided x̂₀ replaces the prediction in the posterior mean (as the v2.0.0 guided sampler does), and
/// <see cref="ModelRequest.X0Coefficient"/> is c₁ = posterior_mean_coef1[index], the official grad_rescale divisor.
/// </summary>
public sealed class SpacedSampler : Sampler
{
    public override string Name => "spaced";
    public SpacedSampler(NoiseSchedule schedule, SamplerOptions? options = null) : base(schedule, options) { }

    /// <summary>IDDPM <c>space_timesteps(T, str(n))</c> with one section: round(i·(T−1)/(n−1)), Python's banker's
    /// rounding, ascending.</summary>
    public static int[] SpaceTimesteps(int numTimesteps, int count)
    {
        if (count > numTimesteps) throw new ArgumentException($"cannot divide section of {numTimesteps} steps into {count}");
        double frac = count <= 1 ? 1 : (numTimesteps - 1) / (double)(count - 1);
        var set = new SortedSet<int>();
        double cur = 0;
        for (int i = 0; i < count; i++) { set.Add((int)Math.Round(cur, MidpointRounding.ToEven)); cur += frac; }
        return set.ToArray();
    }

    /// <summary>The respaced schedule in float64 (official make_schedule), keyed like the registered buffers.</summary>
    public Dictionary<string, double[]> Schedule64(int steps, out int[] timesteps)
    {
        var used = SpaceTimesteps(Schedule.Timesteps, steps);
        var set = used.ToHashSet();
        var ac = Schedule.AlphasCumprod();
        var betas = new List<double>();
        double last = 1.0;
        for (int i = 0; i < ac.Length; i++)
            if (set.Contains(i)) { betas.Add(1 - ac[i] / last); last = ac[i]; }
        timesteps = used;
        int n = betas.Count;
        var acs = new double[n]; var acPrev = new double[n];
        double cum = 1;
        for (int i = 0; i < n; i++) { acPrev[i] = cum; cum *= 1.0 - betas[i]; acs[i] = cum; }
        var pv = new double[n];
        for (int i = 0; i < n; i++) pv[i] = betas[i] * (1.0 - acPrev[i]) / (1.0 - acs[i]);
        if (n < 2) throw new ArgumentException("the official make_schedule needs at least 2 steps (posterior_variance[1])");
        return new Dictionary<string, double[]>
        {
            ["sqrt_alphas_cumprod"] = acs.Select(Math.Sqrt).ToArray(),
            ["sqrt_one_minus_alphas_cumprod"] = acs.Select(a => Math.Sqrt(1 - a)).ToArray(),
            ["sqrt_recip_alphas_cumprod"] = acs.Select(a => Math.Sqrt(1.0 / a)).ToArray(),
            ["sqrt_recipm1_alphas_cumprod"] = acs.Select(a => Math.Sqrt(1.0 / a - 1)).ToArray(),
            ["posterior_variance"] = pv,
            ["posterior_log_variance_clipped"] = pv.Select((v, i) => Math.Log(i == 0 ? pv[1] : v)).ToArray(),
            ["posterior_mean_coef1"] = Enumerable.Range(0, n).Select(i => betas[i] * Math.Sqrt(acPrev[i]) / (1.0 - acs[i])).ToArray(),
            ["posterior_mean_coef2"] = Enumerable.Range(0, n).Select(i => (1.0 - acPrev[i]) * Math.Sqrt(1.0 - betas[i]) / (1.0 - acs[i])).ToArray(),
        };
    }

    public override IReadOnlyDictionary<string, Tensor> Buffers(int steps) =>
        Schedule64(steps, out _).ToDictionary(kv => kv.Key, kv => F32(kv.Value));

    protected internal override IEnumerable<ModelRequest> Run(SamplerContext ctx, Tensor xT, int steps)
    {
        var buf = Schedule64(steps, out var timesteps);
        Tensor Buffer(string k) => ctx.Persist(F32(buf[k]));
        var sqrtAc = Buffer("sqrt_alphas_cumprod"); var sqrt1mAc = Buffer("sqrt_one_minus_alphas_cumprod");
        var recip = Buffer("sqrt_recip_alphas_cumprod"); var recipm1 = Buffer("sqrt_recipm1_alphas_cumprod");
        var c1 = Buffer("posterior_mean_coef1"); var c2 = Buffer("posterior_mean_coef2"); var pvar = Buffer("posterior_variance");
        long bs = xT.shape[0];
        var x = xT;
        for (int i = 0; i < steps; i++)
        {
            int step = timesteps[steps - 1 - i];
            int index = steps - i - 1;
            var modelT = torch.full(new[] { bs }, step, ScalarType.Int64, device: xT.device);
            var t = torch.full(new[] { bs }, index, ScalarType.Int64, device: xT.device);
            double cfg = CfgDenoiser.ScaleAt(Options.CfgScale, Options.RescaleCfg, step);
            var xs = x;
            Tensor AtT(Tensor a) => a.gather(-1, t).reshape(bs, 1, 1, 1);
            Func<Tensor, Tensor> toX0 = Parameterization == Parameterization.Eps
                ? eps => AtT(recip) * xs - AtT(recipm1) * eps
                : v => AtT(sqrtAc) * xs - AtT(sqrt1mAc) * v;
            Func<Tensor, Tensor> fromX0 = Parameterization == Parameterization.Eps
                ? x0 => (AtT(recip) * xs - x0) / AtT(recipm1)
                : x0 => (AtT(sqrtAc) * xs - x0) / AtT(sqrt1mAc);
            yield return ctx.Issue(new ModelRequest
            {
                X = x, T = modelT, Step = i, Timestep = step, CfgScale = cfg,
                // official apply_model: `if uncond is None or cfg_scale == 1.0` with the per-step (rescaled) scale
                UseNegative = cfg != 1.0,
                ToX0 = toX0, FromX0 = fromX0, X0Coefficient = c1[index].item<float>(),
            }, x, t);
            var predX0 = ctx.PredictedX0;
            var mean = AtT(c1) * predX0 + AtT(c2) * x;
            var variance = AtT(pvar);
            var noise = ctx.RandnLike(x);
            var nonzero = t.ne(0).to(ScalarType.Float32).view(-1, 1, 1, 1);
            x = mean + nonzero * torch.sqrt(variance) * noise;
            ctx.Record(x);
        }
        ctx.Result = x;
    }
}
