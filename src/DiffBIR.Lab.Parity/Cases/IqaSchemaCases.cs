using System.Text.Json.Nodes;
using DiffBIR.Lab.Checkpoints;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Parity.Cases;

/// <summary>
/// iqa/schema/*.json: a full-size pyiqa architecture, built on the meta device, has exactly the official keys and
/// shapes; key and value counts as iqa/schema/summary.json states them (the IQA folder has no loading.json).
/// </summary>
public abstract class IqaSchemaCase : SchemaCase
{
    internal static JsonNode Summary(string schemaPath) =>
        JsonNode.Parse(File.ReadAllText(Path.Combine(Path.GetDirectoryName(schemaPath)!, "summary.json")))!["summary"]!;

    public override IEnumerable<CaseOutput> Run(Fixture fixture)
    {
        var schema = Schema.Load(fixture.Path);
        var summary = Summary(fixture.Path)[SummaryKey]
            ?? throw new InvalidOperationException($"summary.json has no entry '{SummaryKey}'");
        var (report, keys, values) = Measure(Build, schema);
        static string First(IReadOnlyList<string> xs) => xs.Count == 0 ? "" : $" (first: {xs[0]})";
        yield return Count("missing keys" + First(report!.Missing), report.Missing.Count, 0);
        yield return Count("unexpected keys" + First(report.Unexpected), report.Unexpected.Count, 0);
        yield return Count("shape mismatches" + First(report.ShapeMismatches), report.ShapeMismatches.Count, 0);
        yield return Count("keys (summary.json)", keys, (long)summary["keys"]!);
        yield return Count("values (summary.json)", values, (long)summary["numel"]!);
        yield return Count("values (schema file)", values, schema.NumElements);
    }
}

/// <summary>
/// iqa/schema/summary.json: every architecture it lists has its schema file beside it, with the key and value counts
/// it states, and a schema case of ours checks that file.
/// </summary>
public sealed class IqaSchemaSummaryCase : IParityCase
{
    public string Case => "schema_summary";
    public string Description => "iqa/schema/summary.json: each listed schema exists, its counts agree, and a case of ours checks it";
    public Tolerance DefaultTolerance => new(0, 0);

    public IEnumerable<CaseOutput> Run(Fixture fixture)
    {
        var dir = Path.GetDirectoryName(fixture.Path)!;
        var implemented = ParityCases.All().Select(c => c.Case).ToHashSet();
        foreach (var (name, entry) in IqaSchemaCase.Summary(fixture.Path).AsObject())
        {
            var file = Path.Combine(dir, name + ".json");
            bool exists = File.Exists(file);
            yield return SchemaCase.Count($"{name}: schema file exists", exists ? 1 : 0, 1);
            if (!exists) continue;
            var schema = Schema.Load(file);
            yield return SchemaCase.Count($"{name}: keys", schema.Shapes.Count, (long)entry!["keys"]!);
            yield return SchemaCase.Count($"{name}: values", schema.NumElements, (long)entry["numel"]!);
            yield return SchemaCase.Count($"{name}: checked by case schema_{name}", implemented.Contains("schema_" + name) ? 1 : 0, 1);
        }
    }
}
