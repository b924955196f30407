using DiffBIR.Lab.Diffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Sampling;

/// <summary>
/// Multistep DPM-Solver / DPM-Solver++ (Lu et al. 2022; official <c>DPMSolverSampler</c> over dpm_solver_pytorch.py),
/// sampler type "dpm[++]_m&lt;order&gt;" (DiffBIR uses "dpm++_m2"). The discrete schedule is turned into a continuous
/// one by piecewise-linear interpolation of log α_t on t ∈ (0, 1] (NoiseScheduleVP 'discrete', with the half-logSNR
/// clipped at −5.1 near t = T, which drops the zero-SNR end of v2.1); steps are uniform in t from 1 to 1/N
/// ('time_uniform'); the network sees the continuous time (t − 1/N)·1000 as float32. The first step is first order,
/// later steps use the previous evaluation; with fewer than 10 steps the last step is first order again
/// (lower_order_final). Both CFG branches go through the network in one batch [negative; positive].
/// The schedule arithmetic is done with float32 tensors, as the official code does.
/// Guidance: DPM-Solver++ works on the data prediction; the guided x̂₀ replaces it in the update that follows, with
/// <see cref="ModelRequest.X0Coefficient"/> the weight of x̂₀ in that update (second order: (1 + 1/(2r₀)) times the
/// first-order weight), so the next state moves by exactly the guide's Δ. The multistep history keeps the model's own
/// x̂₀: a guided entry would be extrapolated against by the next second-order step (its weight −1/(2r₀) is large near
/// the end), which pulled the result away from the target as the scale grew.
/// </summary>
public sealed class DpmSolverSampler : Sampler
{
    public string Spec { get; }
    public bool PlusPlus { get; }
    public int SolverOrder { get; }
    public override string Name => Spec;

    public DpmSolverSampler(NoiseSchedule schedule, SamplerOptions? options, string spec = "dpm++_m2") : base(schedule, options)
    {
        Spec = spec;
        var parts = spec.Split('_');
        if (parts.Length != 2 || parts[1].Length != 2 || (parts[0] != "dpm" && parts[0] != "dpm++"))
            throw new ArgumentException($"sampler spec '{spec}': expected dpm_m<order> or dpm++_m<order>");
        PlusPlus = parts[0] == "dpm++";
        if (parts[1][0] != 'm') throw new NotSupportedException($"sampler spec '{spec}': only multistep ('m') is implemented");
        SolverOrder = parts[1][1] - '0';
        if (SolverOrder is < 1 or > 2) throw new NotSupportedException($"sampler spec '{spec}': orders 1 and 2 are implemented");
    }

    public override IReadOnlyDictionary<string, Tensor> Buffers(int steps) =>
        new Dictionary<string, Tensor> { ["betas"] = F32(Schedule.Betas()) };

    /// <summary>NoiseScheduleVP('discrete', betas) with float32 tensors.</summary>
    public sealed class ContinuousSchedule
    {
        public Tensor LogAlphaArray { get; }   // [1, K]
        public Tensor TArray { get; }          // [1, K]
        public int TotalN { get; }

        /// <summary>Built on the CPU from float32 betas (as the official code on its device), then moved to <paramref name="device"/>.</summary>
        public ContinuousSchedule(Tensor betas, Device? device = null)
        {
            var logAlphas = 0.5 * torch.log(1 - betas).cumsum(0);
            // numerical_clip_alpha(clipped_lambda = −5.1)
            var logSigmas = 0.5 * torch.log(1.0 - torch.exp(2.0 * logAlphas));
            var lambs = (logAlphas - logSigmas).data<float>().ToArray();
            int idx = lambs.Count(l => l < -5.1f);
            if (idx > 0) logAlphas = logAlphas[TensorIndex.Slice(0, -idx)];
            LogAlphaArray = logAlphas.reshape(1, -1).to(ScalarType.Float32);
            TotalN = (int)LogAlphaArray.shape[1];
            TArray = torch.linspace(0.0, 1.0, TotalN + 1, device: betas.device)[TensorIndex.Slice(1)].reshape(1, -1).to(ScalarType.Float32);
            if (device is not null && !IsOn(betas, device))
            {
                LogAlphaArray = LogAlphaArray.to(device);
                TArray = TArray.to(device);
            }
        }

        public Tensor MarginalLogMeanCoeff(Tensor t) => Interpolate(t.reshape(-1, 1), TArray, LogAlphaArray).reshape(-1);
        public Tensor MarginalAlpha(Tensor t) => torch.exp(MarginalLogMeanCoeff(t));
        public Tensor MarginalStd(Tensor t) => torch.sqrt(1.0 - torch.exp(2.0 * MarginalLogMeanCoeff(t)));
        public Tensor MarginalLambda(Tensor t)
        {
            var lmc = MarginalLogMeanCoeff(t);
            var logStd = 0.5 * torch.log(1.0 - torch.exp(2.0 * lmc));
            return lmc - logStd;
        }

        /// <summary>dpm_solver_pytorch.interpolate_fn: piecewise-linear f(x) through (xp, yp), extended linearly
        /// beyond the ends (a literal port, so ties and float32 rounding behave as officially).</summary>
        public static Tensor Interpolate(Tensor x, Tensor xp, Tensor yp)
        {
            long n = x.shape[0], k = xp.shape[1];
            var allX = torch.cat(new[] { x.unsqueeze(2), xp.unsqueeze(0).repeat(n, 1, 1) }, 2);
            var (sortedAllX, xIndices) = torch.sort(allX, 2);
            var xIdx = torch.argmin(xIndices, 2);
            var candStart = xIdx - 1;
            var one = torch.tensor(1L, device: x.device); var km2 = torch.tensor(k - 2, device: x.device); var zero = torch.tensor(0L, device: x.device);
            var startIdx = torch.where(xIdx.eq(0), one, torch.where(xIdx.eq(k), km2, candStart));
            var endIdx = torch.where(startIdx.eq(candStart), startIdx + 2, startIdx + 1);
            var startX = torch.gather(sortedAllX, 2, startIdx.unsqueeze(2)).squeeze(2);
            var endX = torch.gather(sortedAllX, 2, endIdx.unsqueeze(2)).squeeze(2);
            var startIdx2 = torch.where(xIdx.eq(0), zero, torch.where(xIdx.eq(k), km2, candStart));
            var yExp = yp.unsqueeze(0).expand(n, -1, -1);
            var startY = torch.gather(yExp, 2, startIdx2.unsqueeze(2)).squeeze(2);
            var endY = torch.gather(yExp, 2, (startIdx2 + 1).unsqueeze(2)).squeeze(2);
            return startY + (x - startX) * (endY - startY) / (endX - startX);
        }
    }

    protected internal override IEnumerable<ModelRequest> Run(SamplerContext ctx, Tensor xT, int steps)
    {
        if (steps < SolverOrder) throw new ArgumentException($"DPM-Solver multistep needs steps ≥ order ({steps} < {SolverOrder})");
        var betas = F32(Schedule.Betas());
        var ns = new ContinuousSchedule(betas, xT.device);
        ctx.Persist(ns.LogAlphaArray); ctx.Persist(ns.TArray);
        double t0 = 1.0 / ns.TotalN, tT = 1.0;
        var timesteps = ctx.Persist(torch.linspace(tT, t0, steps + 1, device: xT.device));
        var x = xT;
        long bs = xT.shape[0];
        var prevModels = new List<Tensor>();
        var prevTs = new List<int>();

        // The official lambda x, t: model_fn(x, t.expand(B)) → data (dpm++) or noise prediction.
        ModelRequest Evaluate(Tensor xs, int ti, int step, params Tensor?[] keep)
        {
            var t = timesteps[ti];
            var tC = t.expand(bs);
            var tInput = (tC - 1.0 / ns.TotalN) * 1000.0;
            double cfg = Options.CfgScale;
            if (Options.RescaleCfg)
            {
                // model_wrapper applies the cosine schedule to its (float32) continuous model time, for any scale
                var inner = Math.PI * ((1000 - tInput) / 1000).pow(5.0);
                cfg = CfgDenoiser.Rescaled(Options.CfgScale, inner.item<float>());
            }
            var alphaT = ns.MarginalAlpha(t); var sigmaT = ns.MarginalStd(t);
            Func<Tensor, Tensor>? branch = null;
            if (Parameterization == Parameterization.V)
                branch = o =>
                {
                    // noise_pred_fn for v: α_t·v + σ_t·x on the (possibly batched) call
                    int reps = (int)(o.shape[0] / bs);
                    var xx = reps == 1 ? xs : torch.cat(Enumerable.Repeat(xs, reps).ToArray());
                    var tt = reps == 1 ? tC : torch.cat(Enumerable.Repeat(tC, reps).ToArray());
                    return ns.MarginalAlpha(tt).view(-1, 1, 1, 1) * o + ns.MarginalStd(tt).view(-1, 1, 1, 1) * xx;
                };
            Func<Tensor, Tensor> toX0 = noise => (xs - sigmaT * noise) / alphaT;
            Func<Tensor, Tensor> fromX0 = x0 => (xs - alphaT * x0) / sigmaT;
            var lamS = ns.MarginalLambda(t);
            double coef = 1.0;
            if (PlusPlus && ti < steps)
            {
                // ∂x_next/∂x̂₀ of the update that follows: first order −α_next·φ₁(h); second order adds the
                // extrapolation term, (1 + 1/(2·r0)) times that (r0 = h_prev / h).
                var h = ns.MarginalLambda(timesteps[ti + 1]) - lamS;
                coef = -(ns.MarginalAlpha(timesteps[ti + 1]) * torch.expm1(-h)).item<float>();
                int next = ti + 1;
                int nextOrder = next < SolverOrder ? next : steps < 10 ? Math.Min(SolverOrder, steps + 1 - next) : SolverOrder;
                if (nextOrder == 2 && ti >= 1)
                {
                    var h0 = lamS - ns.MarginalLambda(timesteps[ti - 1]);
                    coef *= 1 + 0.5 / (h0 / h).item<float>();
                }
            }
            var r = new ModelRequest
            {
                X = xs, T = tInput, Step = step, Timestep = (int)Math.Round(tInput[0].item<float>()), CfgScale = cfg,
                UseNegative = Options.CfgScale != 1.0, Batching = CfgBatching.NegativeFirst, ToMixingSpace = branch,
                ToX0 = toX0, FromX0 = fromX0, X0Coefficient = coef,
            };
            return ctx.Issue(r, keep.Append(alphaT).Append(sigmaT).Append(tC).ToArray());
        }
        Tensor? delta = null;
        // ++: history = the model's x̂₀; the guide's shift of the newest entry goes into the next update only.
        Tensor ModelValue()
        {
            if (!PlusPlus) return ctx.Output;
            delta = ctx.GuidanceDelta;
            return ctx.ModelX0;
        }

        yield return Evaluate(x, 0, 0);
        prevModels.Add(ModelValue()); prevTs.Add(0);
        for (int step = 1; step < SolverOrder; step++)
        {
            x = Update(ns, x, prevModels, prevTs, timesteps, step, step, delta);
            yield return Evaluate(x, step, step, delta is null ? prevModels.ToArray() : prevModels.Append(delta).ToArray());
            prevTs.Add(step); prevModels.Add(ModelValue());
        }
        for (int step = SolverOrder; step <= steps; step++)
        {
            int stepOrder = steps < 10 ? Math.Min(SolverOrder, steps + 1 - step) : SolverOrder;
            x = Update(ns, x, prevModels, prevTs, timesteps, step, stepOrder, delta);
            for (int i = 0; i < SolverOrder - 1; i++) { prevTs[i] = prevTs[i + 1]; prevModels[i] = prevModels[i + 1]; }
            prevTs[^1] = step;
            if (step < steps)
            {
                yield return Evaluate(x, step, step, delta is null ? prevModels.ToArray() : prevModels.Append(delta).ToArray());
                prevModels[^1] = ModelValue();
            }
        }
        ctx.Result = x;
    }

    Tensor Update(ContinuousSchedule ns, Tensor x, List<Tensor> models, List<int> ts, Tensor timesteps, int step, int order, Tensor? delta = null)
    {
        var t = timesteps[step];
        if (order == 1)
        {
            var s = timesteps[ts[^1]];
            var modelS = delta is null ? models[^1] : models[^1] + delta;
            var lamS = ns.MarginalLambda(s); var lamT = ns.MarginalLambda(t);
            var h = lamT - lamS;
            var logAlphaS = ns.MarginalLogMeanCoeff(s); var logAlphaT = ns.MarginalLogMeanCoeff(t);
            var sigmaS = ns.MarginalStd(s); var sigmaT = ns.MarginalStd(t);
            var alphaT = torch.exp(logAlphaT);
            if (PlusPlus)
            {
                var phi1 = torch.expm1(-h);
                return sigmaT / sigmaS * x - alphaT * phi1 * modelS;
            }
            else
            {
                var phi1 = torch.expm1(h);
                return torch.exp(logAlphaT - logAlphaS) * x - (sigmaT * phi1) * modelS;
            }
        }
        else
        {
            var m1 = models[^2]; var m0 = delta is null ? models[^1] : models[^1] + delta;
            var tp1 = timesteps[ts[^2]]; var tp0 = timesteps[ts[^1]];
            var lp1 = ns.MarginalLambda(tp1); var lp0 = ns.MarginalLambda(tp0); var lt = ns.MarginalLambda(t);
            var logAlphaP0 = ns.MarginalLogMeanCoeff(tp0); var logAlphaT = ns.MarginalLogMeanCoeff(t);
            var sigmaP0 = ns.MarginalStd(tp0); var sigmaT = ns.MarginalStd(t);
            var alphaT = torch.exp(logAlphaT);
            var h0 = lp0 - lp1;
            var h = lt - lp0;
            var r0 = h0 / h;
            var d10 = (1.0 / r0) * (m0 - m1);
            if (PlusPlus)
            {
                var phi1 = torch.expm1(-h);
                return (sigmaT / sigmaP0) * x - (alphaT * phi1) * m0 - 0.5 * (alphaT * phi1) * d10;
            }
            else
            {
                var phi1 = torch.expm1(h);
                return torch.exp(logAlphaT - logAlphaP0) * x - (sigmaT * phi1) * m0 - 0.5 * (sigmaT * phi1) * d10;
            }
        }
    }
}
