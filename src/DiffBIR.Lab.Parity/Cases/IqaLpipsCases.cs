using System.Text;
using System.Text.Json.Nodes;
using DiffBIR.Lab.Checkpoints;
using DiffBIR.Lab.Metrics.Lpips;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Parity.Cases;

/// <summary>
/// iqa/lpips_alex.safetensors and iqa/lpips_vgg.safetensors: pyiqa's <c>lpips</c> / <c>lpips-vgg</c> metric on each
/// run's (target, ref) pair: the score and every stored intermediate (ScalingLayer outputs, trunk features, squared
/// differences of the normalised features, head outputs, per-layer means).
/// </summary>
public abstract class IqaLpipsCase : IParityCase
{
    public abstract string Case { get; }
    public abstract string Description { get; }
    // Per output the tolerance is derived from the fixture's own float32-vs-float64 error (metadata "tolerance", see
    // Tolerances); this default only applies to outputs the metadata does not list.
    public Tolerance DefaultTolerance => new(1e-5, 0);

    /// <summary>Multiple of the fixture's float32-vs-float64 error allowed for our float32 port.</summary>
    public const double ToleranceFactor = 5;

    /// <summary>The fixture's state dict, completed with whatever the fixture regenerates instead of storing.</summary>
    public virtual Dictionary<string, Tensor> StateDict(Fixture f) => f.Weights();

    /// <summary>The fixture's network: built from its <c>metric_opts</c>, every weight loaded strictly.</summary>
    public LpipsMetric LoadModel(Fixture f) => LoadModel(f, StateDict(f));

    static LpipsMetric LoadModel(Fixture f, IReadOnlyDictionary<string, Tensor> sd)
    {
        var model = new LpipsMetric(LpipsConfig.FromJson(f.Config!["metric_opts"]!));
        StateDictLoader.Load(model, sd, strict: true, sourceName: f.Path);
        return model;
    }

    /// <summary>The trace under the fixture's output names (without the run prefix): score, scaled0/1, feat0.k, feat1.k, diff.k, lin.k, res.k.</summary>
    public static IEnumerable<(string Name, Tensor Value)> Named(LpipsTrace t)
    {
        yield return ("score", t.Score);
        yield return ("scaled0", t.Scaled0);
        yield return ("scaled1", t.Scaled1);
        for (int k = 0; k < 5; k++)
        {
            yield return ($"feat0.{k}", t.Feats0[k]);
            yield return ($"feat1.{k}", t.Feats1[k]);
            yield return ($"diff.{k}", t.Diffs[k]);
            yield return ($"lin.{k}", t.Lins[k]);
            yield return ($"res.{k}", t.Res[k]);
        }
    }

    /// <summary>
    /// Tolerance per output: <see cref="ToleranceFactor"/> × the fixture's float32-vs-float64 max_rel of that output
    /// (the score included). The layer means <c>res.k</c> = mean(lin.k) are single numbers whose own float32 error is one
    /// sample that cancellation can make arbitrarily small (lpips_vgg a.res.3: 1.7e-12 while lin.3 errs by 6.4e-10;
    /// another float32 implementation lands at 1.8e-10), so they are also allowed the error they inherit from their
    /// head: |mean Δ| ≤ max |Δ lin.k|, i.e. atol = ToleranceFactor × max_abs(lin.k). (Run in float64, this code lands
    /// within 0.5 % of every float32-vs-float64 max_abs the fixture reports: see the tests.)
    /// </summary>
    public static Dictionary<string, Tolerance> Tolerances(Fixture f)
    {
        var d = new Dictionary<string, Tolerance>(StringComparer.Ordinal);
        if (f.MetaJson("tolerance")?["f32_vs_f64"] is not JsonObject o) return d;
        double Rel(string k) => (double)o[k]!["max_rel"]!;
        double LinAbs(string run, int k) => o[$"{run}.lin.{k}"] is { } l ? ToleranceFactor * (double)l["max_abs"]! : 0;
        foreach (var (k, _) in o) d[k] = new(ToleranceFactor * Rel(k), 0);
        foreach (var run in o.Select(kv => kv.Key[..kv.Key.IndexOf('.')]).Distinct().ToList())
        {
            for (int k = 0; k < 5; k++)
                if (d.ContainsKey($"{run}.res.{k}")) d[$"{run}.res.{k}"] = new(ToleranceFactor * Rel($"{run}.res.{k}"), LinAbs(run, k));
        }
        return d;
    }

    /// <summary>Checks of regenerated weights against the fixture's checksums (none by default).</summary>
    protected virtual IEnumerable<CaseOutput> WeightChecks(Fixture f, IReadOnlyDictionary<string, Tensor> sd) => Array.Empty<CaseOutput>();

    public IEnumerable<CaseOutput> Run(Fixture f)
    {
        var sd = StateDict(f);
        using var model = LoadModel(f, sd);
        foreach (var o in WeightChecks(f, sd)) yield return o;
        var tol = Tolerances(f);
        Tolerance Tol(string name) => tol.TryGetValue(name, out var found) ? found : DefaultTolerance;

        using var _ = torch.no_grad();
        var runs = f.Tensors.Keys.Where(k => k.StartsWith("in.", StringComparison.Ordinal) && k.EndsWith(".ref", StringComparison.Ordinal))
            .Select(k => k[3..^4]).OrderBy(r => r, StringComparer.Ordinal).ToList();
        foreach (var r in runs)
        {
            var target = f.In($"{r}.target");
            var reference = f.In($"{r}.ref");
            // The public entry point gives the score (pyiqa InferenceModel(target, ref)); the trace its intermediates.
            var score = model.Score(target, reference);
            var outputs = Named(model.Trace(target, reference)).Select(o => o.Name == "score" ? (o.Name, score) : o);
            // Each fixture stores a subset of the intermediates (lpips_vgg: lin, res, feat*.4): compare those.
            foreach (var (name, value) in outputs)
                if (f.Tensors.ContainsKey($"out.{r}.{name}"))
                    yield return new CaseOutput($"{r}.{name}", value, Tolerance: Tol($"{r}.{name}"));
        }
    }
}

/// <summary>iqa/lpips_alex.safetensors: LPIPS v0.1 on AlexNet (pyiqa metric <c>lpips</c>), every weight stored.</summary>
public sealed class IqaLpipsAlexCase : IqaLpipsCase
{
    public override string Case => "lpips_alex";
    public override string Description => "pyiqa LPIPS v0.1 AlexNet ('lpips'): score, ScalingLayer, trunk features, diffs, heads, layer means";
}

/// <summary>
/// iqa/lpips_vgg.safetensors: LPIPS v0.1 on VGG16 (pyiqa metric <c>lpips-vgg</c>). The trunk <c>net.*</c> is not
/// stored: it is regenerated with the fixture's counter-based generator (<see cref="CounterInit"/>) and checked against
/// the metadata <c>hashinit</c> checksums first.
/// </summary>
public sealed class IqaLpipsVggCase : IqaLpipsCase
{
    public override string Case => "lpips_vgg";
    public override string Description => "pyiqa LPIPS v0.1 VGG16 ('lpips-vgg', counter-generated trunk): score, heads, layer means, relu5_3";

    public override Dictionary<string, Tensor> StateDict(Fixture f)
    {
        var sd = f.Weights();
        var seed = long.Parse(f.Metadata["seed"]);
        foreach (var (key, info) in f.MetaJson("hashinit")!.AsObject())
        {
            var shape = info!["shape"]!.AsArray().Select(x => (long)x!).ToArray();
            sd[key] = CounterInit.Uniform(seed, key, shape, CounterInit.Amplitude(key, shape));
        }
        return sd;
    }

    protected override IEnumerable<CaseOutput> WeightChecks(Fixture f, IReadOnlyDictionary<string, Tensor> sd)
    {
        foreach (var (key, info) in f.MetaJson("hashinit")!.AsObject())
        {
            var w = sd[key].to_type(ScalarType.Float64).flatten();
            var absSum = (double)info!["abs_sum"]!;
            // float64 sums of the same float32 values in another order: agree to ~1e-13 of the absolute sum.
            var sumTol = new Tolerance(0, 1e-10 * absSum);
            yield return new CaseOutput($"hashinit {key} sum", w.sum(), Expected: torch.tensor((double)info["sum"]!), Tolerance: sumTol);
            yield return new CaseOutput($"hashinit {key} abs_sum", w.abs().sum(), Expected: torch.tensor(absSum), Tolerance: sumTol);
            var first4 = info["first4"]!.AsArray().Select(x => (double)x!).ToArray();
            yield return new CaseOutput($"hashinit {key} first4", w[..first4.Length], Expected: torch.tensor(first4), Tolerance: new(0, 0));
            yield return new CaseOutput($"hashinit {key} last", w[^1], Expected: torch.tensor((double)info["last"]!), Tolerance: new(0, 0));
            var shape = info["shape"]!.AsArray().Select(x => (long)x!).ToArray();
            yield return new CaseOutput($"hashinit {key} a", torch.tensor(CounterInit.Amplitude(key, shape)),
                Expected: torch.tensor((double)info["a_value"]!), Tolerance: new(0, 0));
        }
    }
}

/// <summary>
/// iqa/schema/lpips_alex.json and lpips_vgg.json: the full-size LPIPS as pyiqa builds it (InferenceModel('lpips') /
/// ('lpips-vgg')) has exactly the official keys and shapes, built on the meta device; key and value counts as
/// schema/summary.json states them.
/// </summary>
public abstract class IqaLpipsSchemaCase : IqaSchemaCase
{
    protected abstract LpipsConfig Config { get; }
    protected override nn.Module Build() => new LpipsMetric(Config);
}

public sealed class IqaLpipsAlexSchemaCase : IqaLpipsSchemaCase
{
    public override string Case => "schema_lpips_alex";
    public override string Description => "full-size LPIPS AlexNet ('lpips') state_dict keys and shapes, built on the meta device";
    protected override string SummaryKey => "lpips_alex";
    protected override LpipsConfig Config => LpipsConfig.Alex;
}

public sealed class IqaLpipsVggSchemaCase : IqaLpipsSchemaCase
{
    public override string Case => "schema_lpips_vgg";
    public override string Description => "full-size LPIPS VGG16 ('lpips-vgg') state_dict keys and shapes, built on the meta device";
    protected override string SummaryKey => "lpips_vgg";
    protected override LpipsConfig Config => LpipsConfig.Vgg;
}
