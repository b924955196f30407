using System.Text.Json.Nodes;
using DiffBIR.Lab.Checkpoints;
using DiffBIR.Lab.Metrics.Musiq;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Parity.Cases;

/// <summary>
/// iqa/musiq*.safetensors: pyiqa's MUSIQ through <c>InferenceModel(metric, **metric_opts)(x)</c> — multi-scale patches
/// (resizes, hashed positions, scale ids, masks), stem tokens, encoder output, head, distribution and score — for
/// every run of the file.
/// </summary>
public abstract class IqaMusiqCaseBase : IParityCase
{
    public abstract string Case { get; }
    public abstract string Description { get; }
    // Used only where the fixture has no f32_vs_f64 entry for an output; Run sets a per-output band.
    public Tolerance DefaultTolerance => new(2e-5, 0);

    /// <summary>
    /// A few times the fixture's float32-vs-float64 max_rel of the output (README "Tolerances"), and never below a
    /// few float32 ulps (4·2⁻²³ ≈ 4.8e-7) for outputs whose float64 error is itself at the ulp level.
    /// </summary>
    internal static Tolerance Band(JsonNode? tolerance, string output)
    {
        var maxRel = (double?)tolerance?["f32_vs_f64"]?[output]?["max_rel"];
        return maxRel is { } r ? new Tolerance(Math.Max(5 * r, 4 * Math.Pow(2, -23)), 0) : new Tolerance(2e-5, 0);
    }

    public IEnumerable<CaseOutput> Run(Fixture f)
    {
        var config = f.Config!;
        using var model = new MusiqModel(MusiqConfig.FromJson(config["metric_opts"]!));
        StateDictLoader.Load(model, f.Weights(), strict: true, sourceName: f.Path);
        model.eval();
        var tolerance = f.MetaJson("tolerance");
        var runs = f.Tensors.Keys.Where(k => k.StartsWith("in.", StringComparison.Ordinal) && k.EndsWith(".x", StringComparison.Ordinal))
            .Select(k => k[3..^2]).OrderBy(r => r, StringComparer.Ordinal).ToList();
        var outputs = new List<CaseOutput>();
        foreach (var r in runs)
        {
            var t = model.Trace(f.In($"{r}.x"));
            var exact = new Tolerance(0, 0);
            outputs.Add(new CaseOutput($"{r}.spatial_positions", t.SpatialPositions, Tolerance: exact));
            outputs.Add(new CaseOutput($"{r}.scale_positions", t.ScalePositions, Tolerance: exact));
            outputs.Add(new CaseOutput($"{r}.mask", t.Mask, Tolerance: exact));
            if (f.Tensors.ContainsKey($"out.{r}.patches"))
                outputs.Add(new CaseOutput($"{r}.patches", t.Patches, Tolerance: Band(tolerance, $"{r}.patches")));
            foreach (var (name, value) in new[] { ("tokens", t.Tokens), ("encoded", t.Encoded), ("head", t.Head), ("dist", t.Dist), ("score", t.Score) })
                outputs.Add(new CaseOutput($"{r}.{name}", value, Tolerance: Band(tolerance, $"{r}.{name}")));
        }
        return outputs;
    }
}

/// <summary>musiq.safetensors: the 'musiq' structure (num_class 1, patch 32, lengths [224, 384], all original-resolution patches).</summary>
public sealed class IqaMusiqCase : IqaMusiqCaseBase
{
    public override string Case => "musiq";
    public override string Description => "pyiqa MUSIQ (num_class 1): multi-scale patches, positions, masks, tokens, encoder, score";
}

/// <summary>musiq_ava.safetensors: the 'musiq-ava' structure (num_class 10 + Softmax, unsorted lengths, original resolution cut to 10 tokens).</summary>
public sealed class IqaMusiqAvaCase : IqaMusiqCaseBase
{
    public override string Case => "musiq_ava";
    public override string Description => "pyiqa MUSIQ-AVA (num_class 10): distribution over 10 bins, mean score";
}

/// <summary>
/// iqa/schema/musiq*.json: the full-size MUSIQ of a released checkpoint, built on the meta device, has exactly the
/// official keys and shapes; counts from iqa/schema/summary.json.
/// </summary>
public abstract class IqaMusiqSchemaCaseBase : IqaSchemaCase
{
    protected abstract MusiqConfig Config { get; }
    protected override nn.Module Build() => new MusiqModel(Config);
}

/// <summary>schema/musiq.json: MUSIQ() defaults with num_class 1 (musiq_koniq / spaq / paq2piq checkpoints).</summary>
public sealed class IqaMusiqSchemaCase : IqaMusiqSchemaCaseBase
{
    public override string Case => "schema_musiq";
    public override string Description => "full-size MUSIQ (num_class 1) state_dict keys and shapes, built on the meta device";
    protected override string SummaryKey => "musiq";
    protected override MusiqConfig Config => MusiqConfig.Koniq;
}

/// <summary>schema/musiq_ava.json: MUSIQ() defaults with num_class 10 (musiq_ava checkpoint).</summary>
public sealed class IqaMusiqAvaSchemaCase : IqaMusiqSchemaCaseBase
{
    public override string Case => "schema_musiq_ava";
    public override string Description => "full-size MUSIQ-AVA (num_class 10) state_dict keys and shapes, built on the meta device";
    protected override string SummaryKey => "musiq_ava";
    protected override MusiqConfig Config => MusiqConfig.Ava;
}
