using System.Text.Json.Nodes;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Checkpoints;

/// <summary>
/// The key → shape listing of a full-size released model (../shared/fixtures/schema/*.json, written from the
/// official configs). Our modules must produce exactly these keys and shapes: no missing, no extra.
/// </summary>
public sealed record Schema(IReadOnlyDictionary<string, long[]> Shapes)
{
    public static Schema Load(string path)
    {
        var o = JsonNode.Parse(File.ReadAllText(path))!.AsObject();
        var d = new Dictionary<string, long[]>(StringComparer.Ordinal);
        foreach (var (k, v) in o) d[k] = v!["shape"]!.AsArray().Select(x => (long)x!).ToArray();
        return new Schema(d);
    }

    public long NumElements => Shapes.Values.Sum(s => s.Aggregate(1L, (a, b) => a * b));

    /// <summary>Compares a module's state_dict with the schema; an empty result means they agree exactly.</summary>
    public LoadReport Compare(nn.Module module) => Compare(module.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.shape));

    public LoadReport Compare(IReadOnlyDictionary<string, long[]> actual)
    {
        var missing = Shapes.Keys.Where(k => !actual.ContainsKey(k)).ToList();
        var extra = actual.Keys.Where(k => !Shapes.ContainsKey(k)).ToList();
        var mismatched = Shapes.Where(kv => actual.TryGetValue(kv.Key, out var s) && !s.SequenceEqual(kv.Value))
            .Select(kv => $"{kv.Key}: ours [{string.Join(", ", actual[kv.Key])}] vs official [{string.Join(", ", kv.Value)}]").ToList();
        return new LoadReport(missing, extra, mismatched, actual.Count - extra.Count);
    }
}
