using System.Globalization;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using DiffBIR.Lab.Pipeline;

namespace DiffBIR.Lab.Sweeps;

/// <summary>
/// One point of a sweep: an input and the effective settings (preset defaults ← fixed ← the point's values).
/// <see cref="Id"/> is stable: a hash of the run settings (preset, task, upscale, precision), the input's and HQ's
/// bytes and every effective option — not of the point's position, so a reordered or extended spec still resumes.
/// </summary>
public sealed record SweepPoint(int Index, string Id, int InputIndex, SweepInput Input, string InputSha256, string? HqSha256,
    SweepSettings Settings, IReadOnlyList<SweepValue> Varied)
{
    public PipelineOptions Options => Settings.ToPipelineOptions();
    /// <summary>The point's own values (grid axes and explicit values), e.g. "g_scale=0.5 sampler=spaced".</summary>
    public string Label => Varied.Count == 0 ? "(fixed settings)" : string.Join(" ", Varied.Select(v => $"{v.Name}={v.Value.GetRawText().Trim('"')}"));
}

/// <summary>Shard <see cref="Index"/> of <see cref="Count"/>: point k belongs to shard k mod Count, so every point lands in exactly one.</summary>
public sealed record SweepShard(int Index, int Count)
{
    public static SweepShard All { get; } = new(0, 1);

    public bool Contains(SweepPoint p) => p.Index % Count == Index;

    public override string ToString() => $"{Index}/{Count}";

    /// <summary>"i/n" with 0 ≤ i &lt; n.</summary>
    public static SweepShard Parse(string text, string what = "--shard")
    {
        var parts = text.Split('/');
        if (parts.Length == 2 && int.TryParse(parts[0], NumberStyles.None, CultureInfo.InvariantCulture, out var i)
            && int.TryParse(parts[1], NumberStyles.None, CultureInfo.InvariantCulture, out var n) && n >= 1 && i < n)
            return new SweepShard(i, n);
        throw new OptionException(what, $"expected i/n with 0 ≤ i < n, e.g. 0/4 (got '{text}')");
    }

    /// <summary>
    /// The shard of a Slurm array task: SLURM_ARRAY_TASK_ID − SLURM_ARRAY_TASK_MIN (0 when unset) of
    /// SLURM_ARRAY_TASK_COUNT; <see cref="All"/> outside an array job.
    /// </summary>
    public static SweepShard FromEnvironment(Func<string, string?>? env = null)
    {
        env ??= Environment.GetEnvironmentVariable;
        var id = env("SLURM_ARRAY_TASK_ID");
        var count = env("SLURM_ARRAY_TASK_COUNT");
        if (string.IsNullOrEmpty(id) || string.IsNullOrEmpty(count)) return All;
        var min = env("SLURM_ARRAY_TASK_MIN");
        if (!int.TryParse(id, NumberStyles.None, CultureInfo.InvariantCulture, out var i)
            || !int.TryParse(count, NumberStyles.None, CultureInfo.InvariantCulture, out var n)
            || !int.TryParse(string.IsNullOrEmpty(min) ? "0" : min, NumberStyles.None, CultureInfo.InvariantCulture, out var m)
            || n < 1 || i - m < 0 || i - m >= n)
            throw new OptionException("SLURM_ARRAY_TASK_ID", $"task {id} (min {min ?? "unset"}) of {count} is not a shard i/n with 0 ≤ i < n; give --shard i/n (an array must be contiguous, e.g. --array=0-3)");
        return new SweepShard(i - m, n);
    }
}

/// <summary>Expansion of a spec into points (validated before anything runs).</summary>
public static class SweepPlan
{
    /// <summary>
    /// Every point of <paramref name="spec"/> for a preset whose defaults are <paramref name="defaults"/>, input-major
    /// (all points of the first input, then the next), duplicates (same id) dropped. Reads the inputs to hash them.
    /// Errors name the spec and the field: a missing input, a value of the wrong kind, an option out of range.
    /// </summary>
    public static IReadOnlyList<SweepPoint> Expand(SweepSpec spec, string presetName, PipelineOptions defaults)
    {
        SweepSpecException Err(string field, string cause) => new(spec.Source, field, cause);
        if (spec.Inputs.Count == 0) throw Err("inputs", "no inputs: give at least one image");
        var baseSettings = SweepSettings.From(defaults) with { CustomSchedules = spec.Schedules };
        var assignments = PointAssignments(spec);
        var run = new JsonObject
        {
            ["preset"] = presetName, ["task"] = spec.Task, ["upscale"] = spec.EffectiveUpscale, ["precision"] = spec.Precision,
        };
        var points = new List<SweepPoint>();
        var seen = new HashSet<string>(StringComparer.Ordinal);
        var inputHashes = new Dictionary<string, int>(StringComparer.Ordinal);
        for (int i = 0; i < spec.Inputs.Count; i++)
        {
            var input = spec.Inputs[i];
            var lqSha = HashFile(input.Path, spec.Source, $"inputs[{i}]");
            var hqSha = input.Hq is null ? null : HashFile(input.Hq, spec.Source, $"inputs[{i}].hq");
            var key = lqSha + "|" + hqSha;
            if (inputHashes.TryGetValue(key, out var j))
                throw Err($"inputs[{i}]", $"{input.Path} has the same content as inputs[{j}] ({spec.Inputs[j].Path}): its points would be the same");
            inputHashes[key] = i;
            foreach (var values in assignments)
            {
                var s = baseSettings;
                foreach (var v in spec.FixedValues.Concat(values))
                {
                    try { s = SweepOptions.Get(v.Name).Set(s, v.Value); }
                    catch (FormatException e) { throw Err(v.Where, e.Message); }
                }
                try { PipelineChecks.Validate(s.ToPipelineOptions()); }
                catch (OptionException e)
                {
                    var name = e.Option.TrimStart('-').Replace('-', '_');
                    var where = values.LastOrDefault(v => v.Name == name)?.Where ?? spec.FixedValues.LastOrDefault(v => v.Name == name)?.Where
                                ?? values.FirstOrDefault()?.Where ?? "fixed";
                    var cause = e.Message.StartsWith(e.Option + ": ", StringComparison.Ordinal) ? e.Message[(e.Option.Length + 2)..] : e.Message;
                    throw Err(where, where.EndsWith(name, StringComparison.Ordinal) || where.Contains($".{name}[", StringComparison.Ordinal) ? cause : $"{name}: {cause}");
                }
                var id = PointId(run, lqSha, hqSha, s);
                if (!seen.Add(id)) continue;
                points.Add(new SweepPoint(points.Count, id, i, input, lqSha, hqSha, s, values));
            }
        }
        return points;
    }

    /// <summary>The values of each point, before the inputs: the grid's product (first axis slowest), then the explicit points.</summary>
    static List<IReadOnlyList<SweepValue>> PointAssignments(SweepSpec spec)
    {
        var result = new List<IReadOnlyList<SweepValue>>();
        if (spec.Axes.Count > 0)
        {
            IEnumerable<IReadOnlyList<SweepValue>> product = new[] { (IReadOnlyList<SweepValue>)Array.Empty<SweepValue>() };
            foreach (var axis in spec.Axes)
                product = product.SelectMany(p => axis.Values.Select(v => (IReadOnlyList<SweepValue>)p.Append(v).ToArray())).ToList();
            result.AddRange(product);
        }
        result.AddRange(spec.Points);
        if (result.Count == 0) result.Add(Array.Empty<SweepValue>());
        return result;
    }

    static string PointId(JsonObject run, string lqSha, string? hqSha, SweepSettings s)
    {
        var key = new JsonObject
        {
            ["run"] = run.DeepClone(), ["input_sha256"] = lqSha, ["hq_sha256"] = hqSha, ["settings"] = s.ToJson(),
        };
        // a schedule given as a function is known by its values, not only its name
        if (s.Guidance != "none" && s.CustomSchedule() is { } f) key["schedule_fn"] = ScheduleFingerprint(f);
        var hash = SHA256.HashData(Encoding.UTF8.GetBytes(key.ToJsonString()));
        return Convert.ToHexStringLower(hash)[..16];
    }

    /// <summary>SHA-256 (16 hex digits) of f(t) for t = 0 … 999 (round-trip text).</summary>
    public static string ScheduleFingerprint(Guidance.GuidanceSchedule f)
    {
        var text = string.Join(",", Enumerable.Range(0, 1000).Select(t => f.At(t).ToString("R", CultureInfo.InvariantCulture)));
        return Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(text)))[..16];
    }

    static string HashFile(string path, string source, string field)
    {
        if (!File.Exists(path)) throw new SweepSpecException(source, field, $"{path}: no such file");
        try { return Sha256(path); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { throw new SweepSpecException(source, field, $"{path}: {e.Message}"); }
    }

    internal static string Sha256(string path)
    {
        using var fs = File.OpenRead(path);
        return Convert.ToHexStringLower(SHA256.HashData(fs));
    }
}
