using System.Text.Json.Nodes;
using DiffBIR.Lab.Checkpoints;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Parity;

/// <summary>
/// A full-size schema check (schema/&lt;name&gt;.json): the released configuration is built on the meta device (no
/// memory is allocated) and its state dict must have exactly the official keys and shapes — no missing, no extra —
/// and the official number of values (schema/loading.json's summary).
/// </summary>
public abstract class SchemaCase : IParityCase
{
    public abstract string Case { get; }
    public abstract string Description { get; }
    public Tolerance DefaultTolerance => new(0, 0);
    /// <summary>The entry of loading.json's summary that holds the official key and value counts.</summary>
    protected abstract string SummaryKey { get; }
    /// <summary>Builds the released configuration (called with the meta device as default).</summary>
    protected abstract nn.Module Build();

    /// <summary>Key count and value count of a module's state dict, built on the meta device.</summary>
    public static (LoadReport? Report, long Keys, long Values) Measure(Func<nn.Module> build, Schema? schema = null)
    {
        torch.set_default_device(torch.device("meta"));
        try
        {
            using var m = build();
            var sd = m.state_dict();
            return (schema?.Compare(m), sd.Count, sd.Values.Sum(v => v.numel()));
        }
        finally { torch.set_default_device(torch.CPU); }
    }

    internal static JsonNode LoadingSummary(Fixture f) =>
        JsonNode.Parse(File.ReadAllText(Path.Combine(Path.GetDirectoryName(f.Path)!, "loading.json")))!["summary"]!;

    internal static CaseOutput Count(string name, long actual, long expected) =>
        new(name, torch.tensor((double)actual, ScalarType.Float64), Expected: torch.tensor((double)expected, ScalarType.Float64));

    public virtual IEnumerable<CaseOutput> Run(Fixture fixture)
    {
        var schema = Schema.Load(fixture.Path);
        var summary = LoadingSummary(fixture)[SummaryKey]!;
        var (report, keys, values) = Measure(Build, schema);
        // A failing count names its first offending key, so the report says what is wrong.
        static string First(IReadOnlyList<string> xs) => xs.Count == 0 ? "" : $" (first: {xs[0]})";
        yield return Count("missing keys" + First(report!.Missing), report.Missing.Count, 0);
        yield return Count("unexpected keys" + First(report.Unexpected), report.Unexpected.Count, 0);
        yield return Count("shape mismatches" + First(report.ShapeMismatches), report.ShapeMismatches.Count, 0);
        yield return Count("keys (loading.json)", keys, (long)summary["keys"]!);
        yield return Count("values (loading.json)", values, (long)summary["numel"]!);
        yield return Count("values (schema file)", values, schema.NumElements);
    }
}
