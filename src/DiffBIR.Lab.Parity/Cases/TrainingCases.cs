using System.Text.Json.Nodes;
using DiffBIR.Lab.Checkpoints;
using DiffBIR.Lab.Diffusion;
using DiffBIR.Lab.Models.Stage1;
using DiffBIR.Lab.Training;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Parity.Cases;

/// <summary>Knobs that let a test prove a training case can fail (a wrong learning rate, a lost draw).</summary>
public sealed record TrainingCaseOptions(double? LearningRate = null, int DropDraw = -1);

/// <summary>Shared helpers of the training cases.</summary>
internal static class TrainingCase
{
    /// <summary>Named parameters of a module with their current values (cloned, detached).</summary>
    public static Dictionary<string, Tensor> Snapshot(nn.Module m) =>
        m.named_parameters().ToDictionary(kv => kv.name, kv => kv.parameter.detach().clone());

    /// <summary>A replay source, optionally with one recorded draw removed (tests: a lost draw must make the step fail).</summary>
    public static ReplayTrainingDraws Replay(Fixture f, int dropDraw)
    {
        var all = ReplayTrainingDraws.FromFixture(f);
        if (dropDraw < 0) return all;
        var list = f.MetaJson("draws")!.AsArray().Where(d => d!["tensor"] is not null)
            .Select(d => ((string)d!["kind"]!, f.Get((string)d["tensor"]!), (string?)d["what"] ?? ""))
            .Where((_, i) => i != dropDraw).ToList();
        return new ReplayTrainingDraws(list, f.Path + $" (draw {dropDraw} removed)");
    }

    /// <summary>
    /// Elements of the stepped parameters that differ from <c>out.step1.*</c> by more than <paramref name="atol"/>,
    /// not counting those whose official gradient is within <paramref name="band"/>·max|grad| of zero (there the
    /// sign of AdamW's ±lr first step is float32 noise).
    /// </summary>
    public static long StepOffOutsideNoiseBand(IReadOnlyDictionary<string, Parameter> after, Fixture f, double band, double atol,
        string prefix = "out.")
    {
        long off = 0;
        foreach (var (name, p) in after)
        {
            using var scope = NewDisposeScope();
            var g = f.Get(prefix + "grad." + name);
            var determined = g.abs().gt(band * g.abs().max().item<float>());
            off += (p.detach() - f.Get(prefix + "step1." + name)).abs().gt(atol).logical_and(determined).sum().item<long>();
        }
        return off;
    }

    /// <summary>
    /// The first AdamW step applied to the fixture's STORED gradients with the same TorchSharp optimizer: isolates the
    /// optimizer from gradient rounding (AdamW's first step is ±lr·g/(|g|+eps), so near-zero gradients may flip).
    /// </summary>
    public static Dictionary<string, Tensor> StepOnStoredGrads(Dictionary<string, Tensor> start, Fixture f,
        Func<IEnumerable<Parameter>, optim.Optimizer> makeOptimizer, string gradPrefix = "out.grad.")
    {
        var ps = start.ToDictionary(kv => kv.Key, kv => new Parameter(kv.Value.clone(), requires_grad: true));
        using (var _ = enable_grad())
        {
            // Builds each parameter's .grad as d(sum(p · g))/dp = g exactly.
            var total = ps.Select(kv => (kv.Value * f.Get(gradPrefix + kv.Key)).sum()).Aggregate((a, b) => a + b);
            total.backward();
        }
        var opt = makeOptimizer(ps.Values);
        opt.step();
        return ps.ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone());
    }
}

/// <summary>
/// train_stage1_step: one official stage-1 step (train_stage1.py) on the tiny SwinIR — DropPath masks replayed, summed
/// MSE, backward, AdamW (lr 1e-4, wd 0). Loss, prediction, every gradient and every parameter after the step.
/// </summary>
public sealed class TrainStage1StepCase : IParityCase
{
    public string Case => "train_stage1_step";
    public string Description => "stage-1 training step: SwinIR train mode (DropPath), sum MSE, gradients, AdamW step";
    // README: f32 vs f64 loss 5.2e-8, pred 9e-7, grads 4.2e-6 (relative to max|ref|); a few times these.
    public Tolerance DefaultTolerance => new(2e-5, 0);

    public IEnumerable<CaseOutput> Run(Fixture f) => Run(f, new TrainingCaseOptions());

    /// <summary>One float32 ulp relative to the largest element (libtorch builds may round a fused AdamW update differently).</summary>
    internal const double Ulp = 1.2e-7;

    public static IEnumerable<CaseOutput> Run(Fixture f, TrainingCaseOptions o)
    {
        var cfg = f.Config!;
        var opt = cfg["optimizer"]!;
        double lr = o.LearningRate ?? (double)opt["lr"]!, wd = (double)opt["weight_decay"]!, eps = (double)opt["eps"]!;
        var betas = opt["betas"]!.AsArray().Select(x => (double)x!).ToArray();
        var swinCfg = SwinIRConfig.FromJson(cfg["swinir"]!) with { DropPathRate = (double)cfg["drop_path_rate_default"]! };
        using var model = new SwinIR(swinCfg);
        StateDictLoader.Load(model, f.Weights(), strict: true, sourceName: f.Path);

        var dpr = SwinIR.DropPathRates(swinCfg.DropPathRate, swinCfg.Depths.Sum());
        var expDpr = cfg["dpr"]!.AsArray().Select(x => (double)x!).ToArray();
        yield return new CaseOutput("dpr (stochastic depth per block)", tensor(dpr), Tolerance: new(0, 0), Expected: tensor(expDpr));

        var start = TrainingCase.Snapshot(model);
        var optimizer = optim.AdamW(model.parameters(), lr, betas[0], betas[1], eps, weight_decay: wd);
        var draws = TrainingCase.Replay(f, o.DropDraw);
        using var r = Stage1Trainer.Step(model, f.In("gt"), f.In("lq"), optimizer, draws);
        yield return new CaseOutput("draws left unused", tensor((float)draws.Remaining), Tolerance: new(0, 0), Expected: tensor(0f));
        yield return new CaseOutput("loss", r.Loss.clone(), Tolerance: new(3e-7, 0));
        yield return new CaseOutput("pred", r.Pred.clone(), Tolerance: new(5e-6, 0));
        yield return new CaseOutput("gt_nchw", r.GtNchw.clone(), Tolerance: new(0, 0));

        var after = model.named_parameters().ToDictionary(kv => kv.name, kv => kv.parameter);
        foreach (var (name, p) in after)
            yield return new CaseOutput("grad." + name, p.grad!.detach().clone());
        // AdamW's first step is ±lr·g/(|g|+eps): a wrong lr, beta or eps moves every element. Where the official
        // gradient lies inside its own float32 noise band (|g| ≤ 2e-5·max|g| of the tensor, the README's f32-vs-f64
        // grads band times five — e.g. the key biases of attention, structurally zero), the sign of the step is
        // not determined and |diff| ≤ 2·lr is allowed; every other element must agree within 1e-8.
        foreach (var (name, p) in after)
        {
            var exp = f.Out("step1." + name);
            yield return new CaseOutput("step1." + name, p.detach().clone(), Tolerance: new(0, 2 * lr + 1e-8));
        }
        yield return new CaseOutput("step1 elements off by more than 1e-8 outside the gradient noise band",
            tensor((float)TrainingCase.StepOffOutsideNoiseBand(after, f, 2e-5, 1e-8)), Tolerance: new(0, 0), Expected: tensor(0f));
        // The same optimizer on the official gradients: every stepped parameter within float32 rounding.
        var onStored = TrainingCase.StepOnStoredGrads(start, f,
            ps => optim.AdamW(ps, lr, betas[0], betas[1], eps, weight_decay: wd));
        foreach (var (name, p) in onStored)
            yield return new CaseOutput($"step1 from the official grads.{name}", p, Tolerance: new(Ulp, 0), Expected: f.Out("step1." + name));
    }
}

/// <summary>
/// train_stage2_eps / train_stage2_v: one official IRControlNet step (train_stage2.py) on the tiny ControlLDM —
/// ControlNet initialised from the UNet (checked key by key), posterior / noise-augmentation / diffusion draws
/// replayed, ε or v loss, the ControlNet's gradients (structurally zero ones with an absolute band), one AdamW step
/// with weight decay 0.01; then the same step with the scratch keys at their real value 0 (<c>zeroconv_init</c>).
/// </summary>
public abstract class TrainStage2CaseBase : IParityCase
{
    public abstract string Case { get; }
    public string Description => $"stage-2 training step ({Case}): ControlNet from UNet, loss, ControlNet gradients, AdamW step";
    public Tolerance DefaultTolerance => new(2e-5, 0);

    public IEnumerable<CaseOutput> Run(Fixture f) => Run(f, new TrainingCaseOptions());

    static double D(JsonNode? n) => (double)n!;

    public static IEnumerable<CaseOutput> Run(Fixture f, TrainingCaseOptions o)
    {
        var cfg = f.Config!;
        var opt = cfg["optimizer"]!;
        double lr = o.LearningRate ?? D(opt["lr"]), wd = D(opt["weight_decay"]), eps = D(opt["eps"]);
        var betas = opt["betas"]!.AsArray().Select(x => (double)x!).ToArray();
        var tol = f.MetaJson("tolerances")!;
        var structural = tol["structurally_zero_grads"]!.AsArray().Select(x => (string)x!).ToHashSet();
        const double few = 5;   // "a few times" the README's float32-vs-float64 numbers
        double gradRtol = few * D(tol["grads"]!["max_rel"]);
        double stepAtol = few * D(tol["step_delta"]!["max_abs"]);
        var perOutput = tol["per_output"]!.AsObject();
        var d = cfg["diffusion"]!;
        var schedule = new NoiseSchedule(D(d["linear_start"]), D(d["linear_end"]), (int)d["timesteps"]!, (bool)d["zero_snr"]!,
            (string)d["parameterization"]! == "v" ? Parameterization.V : Parameterization.Eps);
        int noiseAug = (int)cfg["train"]!["noise_aug_timestep"]!;
        var prompts = cfg["prompt"]!.AsArray().Select(x => (string)x!).ToList();

        var dir = Path.GetDirectoryName(f.Path)!;
        var vocab = new[] { dir, Path.Combine(dir, "..") }.Select(p => Path.Combine(p, TokenizerCase.VocabFile)).FirstOrDefault(File.Exists)
                    ?? throw new FileNotFoundException($"{TokenizerCase.VocabFile} not found beside {f.Path} or one folder up");
        var tokenizer = new Models.Clip.ClipTokenizer(vocab);
        var ldmCfg = Models.ControlLdmConfig.FromJson(cfg["cldm"]!);

        // ---- ControlNet initialised from the UNet (official load_pretrained_sd + load_controlnet_from_unet) ----
        var init = f.MetaJson("controlnet_init")!;
        using (var fresh = new Models.ControlLDM(ldmCfg, tokenizer))
        {
            var sd = new Dictionary<string, Tensor>();
            foreach (var (mod, prefix) in new[] { ("unet", "model.diffusion_model."), ("vae", "first_stage_model."), ("clip", "cond_stage_model.") })
                foreach (var (k, v) in f.Weights(mod)) sd[prefix + k] = v;
            sd["model_ema.decay"] = tensor(0.9999f);
            var (unused, missing) = fresh.LoadPretrainedSd(sd, f.Path);
            var expUnused = init["load_pretrained_sd_unused"]!.AsArray().Select(x => (string)x!).OrderBy(x => x).ToList();
            var expMissing = init["load_pretrained_sd_missing"]!.AsArray().Select(x => (string)x!).OrderBy(x => x).ToList();
            bool sdOk = unused.OrderBy(x => x).SequenceEqual(expUnused) && missing.OrderBy(x => x).SequenceEqual(expMissing);
            yield return Flag("load_pretrained_sd: unused / missing keys as official", sdOk);

            var (newZero, scratch) = fresh.controlnet.LoadFromUNet(fresh.unet);
            var expNewZero = init["init_with_new_zero"]!.AsArray().Select(x => (string)x!).OrderBy(x => x).ToList();
            var expScratch = init["init_with_scratch"]!.AsArray().Select(x => (string)x!).OrderBy(x => x).ToList();
            yield return Flag("controlnet_init: init_with_new_zero keys as official", newZero.OrderBy(x => x).SequenceEqual(expNewZero));
            yield return Flag("controlnet_init: init_with_scratch keys as official", scratch.OrderBy(x => x).SequenceEqual(expScratch));
            // Copied and zero-extended keys hold exactly the values the official step started from.
            var expCn = f.Weights("controlnet");
            var mine = fresh.controlnet.state_dict();
            var copied = init["copied"]!.AsArray().Select(x => (string)x!).Concat(expNewZero).ToList();
            long wrong = copied.Count(k => !mine.TryGetValue(k, out var t) || !t.shape.SequenceEqual(expCn[k].shape) || !t.equal(expCn[k]).all().item<bool>());
            yield return new CaseOutput($"controlnet_init: copied / zero-extended keys with other values (of {copied.Count})",
                tensor((float)wrong), Tolerance: new(0, 0), Expected: tensor(0f));
            var hint = mine[expNewZero[0]];
            var unetW = fresh.unet.state_dict()[expNewZero[0]];
            yield return Flag("controlnet_init: the hint channels of input_blocks.0.0.weight are zero",
                hint.narrow(1, unetW.shape[1], hint.shape[1] - unetW.shape[1]).abs().max().item<float>() == 0);
        }

        // ---- the step, from the state the official step started from ----
        var cfgSwin = SwinIRConfig.FromJson(cfg["swinir"]!);
        using var swinir = new SwinIR(cfgSwin);
        StateDictLoader.Load(swinir, f.Weights("swinir"), strict: true, sourceName: f.Path + " swinir");
        using var cldm = new Models.ControlLDM(ldmCfg, tokenizer);
        cldm.LoadComponents(name => f.Weights(name), f.Path);
        cldm.AttentionMode = Models.StableDiffusion.AttentionMode.Vanilla;   // as the fixtures were made
        var start = TrainingCase.Snapshot(cldm.controlnet);
        optim.Optimizer MakeOpt(IEnumerable<Parameter> ps) => optim.AdamW(ps, lr, betas[0], betas[1], eps, weight_decay: wd);
        var optimizer = MakeOpt(cldm.controlnet.parameters());
        var draws = TrainingCase.Replay(f, o.DropDraw);
        using var r = Stage2Trainer.Step(cldm, swinir, schedule, noiseAug, f.In("gt"), f.In("lq"), prompts, optimizer, draws);
        yield return new CaseOutput("draws left unused", tensor((float)draws.Remaining), Tolerance: new(0, 0), Expected: tensor(0f));
        yield return new CaseOutput("t (scripted)", r.T.to(ScalarType.Float32),
            Expected: tensor(cfg["scripted_t"]!.AsArray().Select(x => (float)(int)x!).ToArray()), Tolerance: new(0, 0));
        Tolerance Out(string n) => new(few * D(perOutput[n]!["max_rel"]), 0);
        yield return new CaseOutput("loss", r.Loss.clone(), Tolerance: Out("loss"));
        foreach (var (n, t) in new[] { ("z_0", r.Z0), ("clean", r.Clean), ("c_txt", r.CTxt), ("c_img", r.CImg), ("c_img_aug", r.CImgAug),
                     ("x_noisy", r.XNoisy), ("model_output", r.ModelOutput), ("target", r.Target) })
            yield return new CaseOutput(n, t.clone(), Tolerance: Out(n));

        var after = cldm.controlnet.named_parameters().ToDictionary(kv => kv.name, kv => kv.parameter);
        foreach (var (name, p) in after)
            yield return new CaseOutput("grad." + name, p.grad!.detach().clone(),
                Tolerance: structural.Contains(name) ? new(0, 1e-8) : new(gradRtol, 0));
        // AdamW's first step is −lr·g/(|g| + eps): where |g| is not far above eps the step inherits the gradient's
        // rounding, amplified by eps/(|g| + eps)² (up to ±lr where |g| ≲ eps, as in the structurally zero
        // gradients). Each element may therefore differ by stepAtol plus what the accepted gradient error implies
        // there; the envelope per tensor is 2·lr.
        foreach (var (name, p) in after)
            yield return new CaseOutput("step1." + name, p.detach().clone(), Tolerance: new(0, 2 * lr + stepAtol));
        long off = 0;
        foreach (var (name, p) in after)
        {
            using var scope = NewDisposeScope();
            var g = f.Out("grad." + name).to(ScalarType.Float64);
            double dg = structural.Contains(name) ? 1e-8 : gradRtol * g.abs().max().item<double>();
            var allowed = (lr * dg * eps / (g.abs() + eps).pow(2)).clamp_max(2 * lr) + stepAtol;
            off += (p.detach().to(ScalarType.Float64) - f.Out("step1." + name)).abs().gt(allowed).sum().item<long>();
        }
        yield return new CaseOutput("step1 elements beyond stepAtol + the step error implied by the gradient tolerance",
            tensor((float)off), Tolerance: new(0, 0), Expected: tensor(0f));
        // The same optimizer on the official gradients (isolates AdamW, decoupled weight decay included).
        var onStored = TrainingCase.StepOnStoredGrads(start, f, MakeOpt);
        foreach (var (name, p) in onStored)
            yield return new CaseOutput($"step1 from the official grads.{name}", p, Tolerance: new(TrainStage1StepCase.Ulp, 0), Expected: f.Out("step1." + name));

        // ---- zeroconv_init: the scratch keys at their constructor value 0 ----
        var scratchKeys = init["init_with_scratch"]!.AsArray().Select(x => (string)x!).ToHashSet();
        StateDictLoader.Load(cldm.controlnet, f.Weights("controlnet"), strict: true, sourceName: f.Path + " controlnet");
        using (no_grad()) foreach (var (name, p) in cldm.controlnet.named_parameters()) if (scratchKeys.Contains(name)) p.zero_();
        var startZ = TrainingCase.Snapshot(cldm.controlnet);
        var optZ = MakeOpt(cldm.controlnet.parameters());
        using var rz = Stage2Trainer.Step(cldm, swinir, schedule, noiseAug, f.In("gt"), f.In("lq"), prompts, optZ, TrainingCase.Replay(f, o.DropDraw));
        yield return new CaseOutput("zeroconv_init.loss", rz.Loss.clone(), Tolerance: Out("loss"));
        var afterZ = cldm.controlnet.named_parameters().ToDictionary(kv => kv.name, kv => kv.parameter);
        double otherGradMax = 0, otherStepMax = 0;
        foreach (var (name, p) in afterZ)
        {
            if (scratchKeys.Contains(name))
            {
                yield return new CaseOutput("zeroconv_init.grad." + name, p.grad!.detach().clone(), Tolerance: new(gradRtol, 0));
                yield return new CaseOutput("zeroconv_init.step1." + name, p.detach().clone(), Tolerance: new(0, stepAtol));
                continue;
            }
            otherGradMax = Math.Max(otherGradMax, p.grad is null ? 0 : p.grad.abs().max().item<float>());
            using var decayed = startZ[name].mul(1 - lr * wd);
            otherStepMax = Math.Max(otherStepMax, (p.detach() - decayed).abs().max().item<float>());
        }
        yield return new CaseOutput("zeroconv_init: max |grad| of the non-scratch keys (exactly 0)", tensor(otherGradMax), Tolerance: new(0, 0), Expected: tensor(0.0));
        yield return new CaseOutput("zeroconv_init: max |step1 − w·(1 − lr·wd)| of the non-scratch keys (exactly 0)", tensor(otherStepMax), Tolerance: new(0, 0), Expected: tensor(0.0));
    }

    static CaseOutput Flag(string name, bool ok) => new(name, tensor(ok ? 1f : 0f), Tolerance: new(0, 0), Expected: tensor(1f));
}

/// <summary>train_stage2_eps: v2 schedule, ε target, no condition noise augmentation, lr 1e-4.</summary>
public sealed class TrainStage2EpsCase : TrainStage2CaseBase
{
    public override string Case => "train_stage2_eps";
}

/// <summary>train_stage2_v: v2.1 schedule (zero terminal SNR), v target, condition noise augmentation (t_aug &lt; 200), lr 1e-5.</summary>
public sealed class TrainStage2VCase : TrainStage2CaseBase
{
    public override string Case => "train_stage2_v";
}

/// <summary>
/// degradation_second_order: the official RealESRGANBatchTransform (v2.1 settings) on one 64×64 batch, python/numpy
/// choices scripted, torch draws replayed; every intermediate (USM, blur, resizes, Poisson/Gaussian noise, DiffJPEG,
/// sinc) and the final hq / lq.
/// </summary>
public sealed class DegradationSecondOrderCase : IParityCase
{
    public string Case => "degradation_second_order";
    public string Description => "Real-ESRGAN second-order batch degradation (USM, filter2D, resizes, noise, DiffJPEG, sinc)";
    // README: continuous stages rtol ~1e-5; quantised stages (JPEG, the 1/255 lq) may flip rarely.
    public Tolerance DefaultTolerance => new(1e-5, 0);

    public IEnumerable<CaseOutput> Run(Fixture f) => Run(f, new TrainingCaseOptions());

    /// <summary>The scripted python/numpy draws of the fixture as a degradation random source.</summary>
    public static Degradation.ScriptedDegradationRandom Scripted(Fixture f)
    {
        var uniforms = new List<double>();
        var choices = new List<int>();
        string[] upDown = { "up", "down", "keep" }, modes = { "area", "bilinear", "bicubic" };
        foreach (var d in f.MetaJson("draws")!.AsArray())
        {
            var kind = (string)d!["kind"]!;
            var v = d["value_or_shape"]!;
            switch (kind)
            {
                case "np.random.uniform": uniforms.Add((double)v); break;
                case "random.choices": choices.Add(Array.IndexOf(upDown, (string)v.AsArray()[0]!)); break;
                case "random.choice": choices.Add(Array.IndexOf(modes, (string)v!)); break;
            }
        }
        return new Degradation.ScriptedDegradationRandom(uniforms, choices);
    }

    public static IEnumerable<CaseOutput> Run(Fixture f, TrainingCaseOptions o)
    {
        var cfg = Degradation.RealEsrganBatchTransformConfig.FromJson(f.Config!["batch_transform"]!);
        var rng = Scripted(f);
        var draws = TrainingCase.Replay(f, o.DropDraw);
        var steps = new List<(string, Tensor)>();
        var (hq, lq) = Degradation.RealEsrganBatchTransform.Apply(cfg, f.In("hq"), f.In("kernel1"), f.In("kernel2"), f.In("sinc_kernel"),
            rng, draws, (n, t) => steps.Add((n, t.clone().DetachFromDisposeScope())));
        yield return new CaseOutput("draws left unused", tensor((float)(draws.Remaining + rng.RemainingUniforms + rng.RemainingChoices)),
            Tolerance: new(0, 0), Expected: tensor(0f));
        var names = f.MetaJson("intermediates")!.AsArray().Select(x => (string)x!).ToList();
        yield return new CaseOutput("intermediate steps as official", tensor(steps.Select(s => s.Item1).SequenceEqual(names) ? 1f : 0f),
            Tolerance: new(0, 0), Expected: tensor(1f));
        foreach (var (n, t) in steps) yield return new CaseOutput(n, t);
        yield return new CaseOutput("hq", hq);
        yield return new CaseOutput("lq", lq);
    }
}
