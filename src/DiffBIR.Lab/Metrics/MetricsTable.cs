using System.Globalization;
using System.Text;

namespace DiffBIR.Lab.Metrics;

/// <summary>A prediction and, for full-reference metrics, its reference (same file-name stem).</summary>
public sealed record ImagePair(string Name, string Pred, string? Ref);

/// <summary>The pairs found in two folders and what could not be paired.</summary>
public sealed record PairingResult(IReadOnlyList<ImagePair> Pairs, IReadOnlyList<string> Unpaired);

/// <summary>Pairs images of two folders by file-name stem and writes the per-image metrics table.</summary>
public static class MetricsTable
{
    /// <summary>File extensions read as images (case-insensitive).</summary>
    public static readonly string[] ImageExtensions = { ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp" };

    static Dictionary<string, string> ByStem(string dir, List<string> problems)
    {
        if (!Directory.Exists(dir)) throw new DirectoryNotFoundException($"{dir}: folder not found");
        var groups = Directory.EnumerateFiles(dir)
            .Where(f => ImageExtensions.Contains(Path.GetExtension(f).ToLowerInvariant()))
            .GroupBy(f => Path.GetFileNameWithoutExtension(f), StringComparer.Ordinal);
        var map = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var g in groups)
        {
            var files = g.Order(StringComparer.Ordinal).ToList();
            if (files.Count == 1) map[g.Key] = files[0];
            else problems.Add($"{string.Join(" and ", files)}: same name stem in one folder; not used");
        }
        return map;
    }

    /// <summary>
    /// Pairs <paramref name="predDir"/> with <paramref name="refDir"/> by stem (<c>a.png</c> with <c>a.jpg</c>); with
    /// no reference folder every prediction is a pair of its own. Unpaired lists each file without a partner, and
    /// files whose stem appears twice in one folder.
    /// </summary>
    public static PairingResult Pair(string predDir, string? refDir)
    {
        var problems = new List<string>();
        var preds = ByStem(predDir, problems);
        if (refDir is null)
            return new PairingResult(preds.OrderBy(kv => kv.Key, StringComparer.Ordinal).Select(kv => new ImagePair(kv.Key, kv.Value, null)).ToList(), problems);
        var refs = ByStem(refDir, problems);
        var pairs = new List<ImagePair>();
        foreach (var (stem, p) in preds.OrderBy(kv => kv.Key, StringComparer.Ordinal))
        {
            if (refs.TryGetValue(stem, out var r)) pairs.Add(new ImagePair(stem, p, r));
            else problems.Add($"{p}: no reference named {stem}.* in {refDir}");
        }
        foreach (var (stem, r) in refs.OrderBy(kv => kv.Key, StringComparer.Ordinal))
            if (!preds.ContainsKey(stem)) problems.Add($"{r}: no prediction named {stem}.* in {predDir}");
        return new PairingResult(pairs, problems);
    }

    /// <summary>A column header: the metric name, with "[random-weights]" for the labelled test mode.</summary>
    public static string Column(Metric m) => m.RandomWeights ? m.Name + "[random-weights]" : m.Name;

    static string Num(double v) => double.IsNaN(v) ? "" : v.ToString("G10", CultureInfo.InvariantCulture);

    static string Cell(string s) => s.IndexOfAny(new[] { ',', '"', '\n', '\r' }) < 0 ? s : "\"" + s.Replace("\"", "\"\"") + "\"";

    /// <summary>
    /// The CSV: header <c>name,pred,ref,&lt;metric&gt;…</c>, one row per pair (an empty cell where a metric failed on
    /// that pair), then a row <c>mean</c> with each column's mean over the pairs it has a value for.
    /// </summary>
    public static string Csv(IReadOnlyList<string> columns, IReadOnlyList<ImagePair> pairs, IReadOnlyList<double[]> values)
    {
        var sb = new StringBuilder();
        sb.Append("name,pred,ref");
        foreach (var c in columns) sb.Append(',').Append(Cell(c));
        sb.Append('\n');
        for (int i = 0; i < pairs.Count; i++)
        {
            sb.Append(Cell(pairs[i].Name)).Append(',').Append(Cell(pairs[i].Pred)).Append(',').Append(Cell(pairs[i].Ref ?? ""));
            foreach (var v in values[i]) sb.Append(',').Append(Num(v));
            sb.Append('\n');
        }
        sb.Append("mean,,");
        foreach (var m in Means(columns.Count, values)) sb.Append(',').Append(Num(m));
        sb.Append('\n');
        return sb.ToString();
    }

    /// <summary>Mean of each column over the rows that have a value (NaN = no value).</summary>
    public static double[] Means(int columns, IReadOnlyList<double[]> values) =>
        Enumerable.Range(0, columns).Select(j =>
        {
            var v = values.Select(r => r[j]).Where(x => !double.IsNaN(x)).ToList();
            return v.Count == 0 ? double.NaN : v.Average();
        }).ToArray();
}
