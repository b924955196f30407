using System.Text.Json.Nodes;

namespace DiffBIR.Lab.Models.Stage1;

/// <summary>Reads the constructor arguments of an official config (the fixtures' <c>config</c> metadata, the yaml <c>params</c>).</summary>
internal static class ConfigJson
{
    /// <summary>The object's keys that are neither used nor known to be irrelevant: a config we would silently misread.</summary>
    public static void RejectUnknown(JsonObject o, string network, IEnumerable<string> known)
    {
        var set = new HashSet<string>(known, StringComparer.Ordinal);
        var unknown = o.Select(kv => kv.Key).Where(k => !set.Contains(k)).ToList();
        if (unknown.Count > 0)
            throw new ArgumentException($"{network} config: unsupported argument(s) {string.Join(", ", unknown)}; "
                                        + $"this port knows {string.Join(", ", set)}");
    }

    public static int Int(JsonObject o, string key, int fallback) => o[key] is { } v ? (int)v : fallback;
    public static double Double(JsonObject o, string key, double fallback) => o[key] is { } v ? (double)v : fallback;
    public static bool Bool(JsonObject o, string key, bool fallback) => o[key] is { } v ? (bool)v : fallback;
    public static string String(JsonObject o, string key, string fallback) => o[key] is { } v ? (string)v! : fallback;
    public static int[] Ints(JsonObject o, string key, int[] fallback) =>
        o[key] is JsonArray a ? a.Select(x => (int)x!).ToArray() : fallback;
}
