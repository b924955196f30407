using System.Text.Json.Nodes;
using DiffBIR.Lab.Checkpoints;
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
