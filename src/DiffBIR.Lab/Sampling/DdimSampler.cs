using DiffBIR.Lab.Diffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Sampling;

/// <summary>
/// DDIM (Song et al. 2021; official <c>DDIMSampler</c>, from LDM): "uniform" timesteps range(0, 1000, 1000//n) + 1
/// (so t = 999 is never visited: [1, 251, 501, 751] for 4 steps), x_{prev} = √ᾱ_prev x̂₀ + √(1 − ᾱ_prev − σ²) ε + σ z
/// with σ = η·√((1 − ᾱ_prev)/(1 − ᾱ)·(1 − ᾱ/ᾱ_prev)). The pipeline hard-codes η = 0, but the official code still draws
/// a normal every step (times σ = 0); so does this port, to keep the noise stream aligned.
/// Both CFG branches go through the network in one batch [positive; negative]. v-prediction is turned into ε first.
/// Guidance: a guided x̂₀ replaces the prediction and ε is re-derived from it, ε = (x − √ᾱ x̂₀)/√(1 − ᾱ), so both
/// terms of the update follow the guided estimate.
/// </summary>
public sealed class DdimSampler : Sampler
{
    public override string Name => "ddim";
    /// <summary>η of DDIM; the official pipeline passes 0.</summary>
    public double DdimEta { get; }

    public DdimSampler(NoiseSchedule schedule, SamplerOptions? options = null, double eta = 0.0) : base(schedule, options) => DdimEta = eta;

    public static int[] UniformTimesteps(int numTimesteps, int steps)
    {
        int c = numTimesteps / steps;
        var list = new List<int>();
        for (int i = 0; i < numTimesteps; i += c) list.Add(i + 1);
        return list.ToArray();
    }

    public Dictionary<string, double[]> Schedule64(int steps, out int[] timesteps)
    {
        timesteps = UniformTimesteps(Schedule.Timesteps, steps);
        var ac = Schedule.AlphasCumprod();
        var ts = timesteps;
        var a = ts.Select(t => ac[t]).ToArray();
        var aPrev = new[] { ac[0] }.Concat(ts.Take(ts.Length - 1).Select(t => ac[t])).ToArray();
        var sig = a.Select((at, i) => DdimEta * Math.Sqrt((1 - aPrev[i]) / (1 - at) * (1 - at / aPrev[i]))).ToArray();
        return new Dictionary<string, double[]>
        {
            ["ddim_sigmas"] = sig,
            ["ddim_alphas"] = a,
            ["ddim_sqrt_alphas"] = a.Select(Math.Sqrt).ToArray(),
            ["ddim_alphas_prev"] = aPrev,
            ["ddim_sqrt_one_minus_alphas"] = a.Select(v => Math.Sqrt(1.0 - v)).ToArray(),
        };
    }

    public override IReadOnlyDictionary<string, Tensor> Buffers(int steps) =>
        Schedule64(steps, out _).ToDictionary(kv => kv.Key, kv => F32(kv.Value));

    protected internal override IEnumerable<ModelRequest> Run(SamplerContext ctx, Tensor xT, int steps)
    {
        var buf = Schedule64(steps, out var timesteps);
        Tensor Buffer(string k) => ctx.Persist(F32(buf[k]));
        var alphas = Buffer("ddim_alphas"); var alphasPrev = Buffer("ddim_alphas_prev"); var sigmas = Buffer("ddim_sigmas");
        var sqrtA = Buffer("ddim_sqrt_alphas"); var sqrt1mA = Buffer("ddim_sqrt_one_minus_alphas");
        int total = timesteps.Length;
        long bs = xT.shape[0];
        var x = xT;
        for (int i = 0; i < total; i++)
        {
            int step = timesteps[total - 1 - i];
            var modelT = torch.full(new[] { bs }, step, ScalarType.Int64, device: xT.device);
            var t = torch.full(new[] { bs }, total - i - 1, ScalarType.Int64, device: xT.device);
            double cfg = CfgDenoiser.ScaleAt(Options.CfgScale, Options.RescaleCfg, step);
            Tensor AtT(Tensor b) => b.gather(-1, t).reshape(bs, 1, 1, 1);
            var xs = x;
            Func<Tensor, Tensor> epsOf = Parameterization == Parameterization.Eps
                ? o => o
                : v => AtT(sqrtA) * v + AtT(sqrt1mA) * xs;   // official predict_eps_from_z_and_v
            Func<Tensor, Tensor> toX0 = o => (xs - AtT(sqrt1mA) * epsOf(o)) / AtT(alphas).sqrt();
            // x̂₀ → the model output that gives it (ε, or v = (√ᾱ x − x̂₀)/√(1−ᾱ)... expressed through ε).
            Func<Tensor, Tensor> fromX0 = x0 =>
            {
                var eps = (xs - AtT(alphas).sqrt() * x0) / AtT(sqrt1mA);
                return Parameterization == Parameterization.Eps ? eps : (eps - AtT(sqrt1mA) * xs) / AtT(sqrtA);
            };
            double aT = buf["ddim_alphas"][total - i - 1], aP = buf["ddim_alphas_prev"][total - i - 1], sT = buf["ddim_sigmas"][total - i - 1];
            yield return ctx.Issue(new ModelRequest
            {
                X = x, T = modelT, Step = i, Timestep = step, CfgScale = cfg, UseNegative = cfg != 1.0,
                Batching = CfgBatching.PositiveFirst, ToX0 = toX0, FromX0 = fromX0,
                X0Coefficient = Math.Sqrt(aP) - Math.Sqrt(1 - aP - sT * sT) * Math.Sqrt(aT) / Math.Sqrt(1 - aT),
            }, x, t);
            Tensor eT, predX0;
            if (ctx.Guided)
            {
                predX0 = ctx.PredictedX0;
                eT = (x - AtT(alphas).sqrt() * predX0) / AtT(sqrt1mA);
            }
            else
            {
                eT = epsOf(ctx.Output);
                predX0 = (x - AtT(sqrt1mA) * eT) / AtT(alphas).sqrt();
            }
            var aPrev = AtT(alphasPrev);
            var sigmaT = AtT(sigmas);
            var dirXt = (1.0 - aPrev - sigmaT.pow(2)).sqrt() * eT;
            var noise = sigmaT * ctx.RandnLike(x);
            x = aPrev.sqrt() * predX0 + dirXt + noise;
            ctx.Record(x);
        }
        ctx.Result = x;
    }
}
