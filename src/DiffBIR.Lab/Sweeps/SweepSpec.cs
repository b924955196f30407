using System.Text.Json;
using System.Text.Json.Nodes;

namespace DiffBIR.Lab.Sweeps;

/// <summary>A spec is wrong; the message names the spec (file) and the field, e.g. <c>spec.json: grid.g_scale[1]: expected a number</c>.</summary>
public sealed class SweepSpecException : ArgumentException
{
    public string Source { get; }
    public string Field { get; }
    public SweepSpecException(string source, string field, string cause) : base($"{source}: {field}: {cause}") { Source = source; Field = field; }
}

/// <summary>An input of a sweep: the degraded image and, optionally, its high-quality reference (for PSNR / SSIM).</summary>
public sealed record SweepInput(string Path, string? Hq = null);

/// <summary>One option value of a spec, with where it was given (<c>grid.g_scale[1]</c>, <c>fixed.steps</c>, <c>points[2].seed</c>).</summary>
public sealed record SweepValue(string Name, JsonElement Value, string Where);

/// <summary>An option and the values a grid takes it through.</summary>
public sealed record SweepAxis(string Name, IReadOnlyList<SweepValue> Values);

/// <summary>
/// What to sweep: inputs (with optional HQ references) × points. Points are the Cartesian product of
/// <see cref="Axes"/> (the grid; first axis slowest) followed by the explicit <see cref="Points"/>; each point is the preset's
/// defaults, then <see cref="Fixed"/>, then its own values (or <see cref="Fixed"/> alone when there is neither grid
/// nor points). Option names are <see cref="SweepOptions.Names"/>. Immutable: the builder methods return new specs.
/// From JSON with <see cref="Parse"/> / <see cref="Load"/>; from F#:
/// <code>SweepSpec.On("lq.png", "hq.png").Fixed("steps", 2).Fixed("guidance", "wmse").Grid("g_scale", 0.1, 0.5, 1.0)</code>
/// </summary>
public sealed record SweepSpec
{
    public IReadOnlyList<SweepInput> Inputs { get; init; } = Array.Empty<SweepInput>();
    public IReadOnlyList<SweepValue> FixedValues { get; init; } = Array.Empty<SweepValue>();
    public IReadOnlyList<SweepAxis> Axes { get; init; } = Array.Empty<SweepAxis>();
    public IReadOnlyList<IReadOnlyList<SweepValue>> Points { get; init; } = Array.Empty<IReadOnlyList<SweepValue>>();
    /// <summary>Preset name (v1, v2, v2.1, tiny, custom); null: the caller's choice.</summary>
    public string? Preset { get; init; }
    public string Task { get; init; } = "sr";
    /// <summary>Final upscale; null: 4 for sr, 1 otherwise (as <c>restore</c>).</summary>
    public double? Upscale { get; init; }
    /// <summary>fp32, fp16 or bf16 (a build option: one per sweep).</summary>
    public string Precision { get; init; } = "fp32";
    /// <summary>Extra metrics by registry name (<see cref="Metrics.Metric.Get"/>): no-reference ones give a column
    /// each, full-reference ones a column "NAME_hq" against the HQ reference. PSNR and SSIM against HQ and I_RM are always computed.</summary>
    public IReadOnlyList<string> Metrics { get; init; } = Array.Empty<string>();
    /// <summary>Write every point's image (and its manifest) under images/; false keeps only the table.</summary>
    public bool SaveImages { get; init; } = true;
    /// <summary>Where the spec came from (its file, or "spec"); errors name it.</summary>
    public string Source { get; init; } = "spec";
    /// <summary>Guidance schedules given as functions f(t) (<see cref="Schedule"/>), used by <c>g_schedule</c> values "fn:NAME".</summary>
    public IReadOnlyDictionary<string, Guidance.GuidanceSchedule> Schedules { get; init; } = new Dictionary<string, Guidance.GuidanceSchedule>();

    public double EffectiveUpscale => Upscale ?? (Task == "sr" ? 4 : 1);

    // ------------------------------------------------------------------------------------------------- builders

    /// <summary>A spec on one input (and its optional HQ reference).</summary>
    public static SweepSpec On(string path, string? hq = null) => new() { Inputs = new[] { new SweepInput(path, hq) } };

    public SweepSpec AddInput(string path, string? hq = null) => this with { Inputs = Inputs.Append(new SweepInput(path, hq)).ToArray() };

    /// <summary>An option value every point shares (replacing an earlier one of that name).</summary>
    public SweepSpec Fixed(string name, object value)
    {
        Known(name, $"fixed.{name}");
        return this with { FixedValues = FixedValues.Where(v => v.Name != name).Append(new SweepValue(name, Value(value, $"fixed.{name}"), $"fixed.{name}")).ToArray() };
    }

    /// <summary>A grid axis: the option takes each value in turn (replacing an earlier axis of that name).</summary>
    public SweepSpec Grid(string name, params object[] values)
    {
        Known(name, $"grid.{name}");
        if (values.Length == 0) throw new SweepSpecException(Source, $"grid.{name}", "an axis needs at least one value");
        var axis = new SweepAxis(name, values.Select((v, i) => new SweepValue(name, Value(v, $"grid.{name}[{i}]"), $"grid.{name}[{i}]")).ToArray());
        return this with { Axes = Axes.Where(a => a.Name != name).Append(axis).ToArray() };
    }

    /// <summary>An explicit point (option name → value), run in addition to the grid.</summary>
    public SweepSpec Point(IEnumerable<KeyValuePair<string, object>> values)
    {
        int k = Points.Count;
        var point = values.Select(kv =>
        {
            Known(kv.Key, $"points[{k}].{kv.Key}");
            return new SweepValue(kv.Key, Value(kv.Value, $"points[{k}].{kv.Key}"), $"points[{k}].{kv.Key}");
        }).ToArray();
        return this with { Points = Points.Append(point).ToArray() };
    }

    /// <summary>
    /// A guidance schedule given as a function f(t) of the model timestep t (999 … 0), under a name that g_schedule
    /// values use as "fn:NAME": the scale in effect is s(t) = g_scale · f(t). From F#:
    /// <code>spec.Schedule("late", fun t -> if t &lt; 500 then 1.0 else 0.0).Grid("g_schedule", "constant", "fn:late")</code>
    /// Point ids include f's values at t = 0 … 999, so changing the function (not only its name) reruns its points.
    /// </summary>
    public SweepSpec Schedule(string name, Func<int, double> f)
    {
        if (string.IsNullOrEmpty(name) || !name.All(c => char.IsAsciiLetterOrDigit(c) || c is '_' or '-' or '.'))
            throw new SweepSpecException(Source, $"schedules.{name}", "a schedule name is letters, digits, '_', '-' or '.'");
        var all = new Dictionary<string, Guidance.GuidanceSchedule>(Schedules) { [name] = new Guidance.GuidanceSchedule(f, "fn:" + name) };
        return this with { Schedules = all };
    }

    public SweepSpec WithPreset(string preset, string task = "sr", double? upscale = null) => this with { Preset = preset, Task = task, Upscale = upscale };

    public SweepSpec WithMetrics(params string[] names)
    {
        foreach (var n in names) KnownMetric(n, "metrics");
        return this with { Metrics = names };
    }

    void Known(string name, string where)
    {
        if (!SweepOptions.IsKnown(name))
            throw new SweepSpecException(Source, where, $"unknown option '{name}' (known: {string.Join(", ", SweepOptions.Names)})");
    }

    void KnownMetric(string name, string where)
    {
        try { Lab.Metrics.Metric.Describe(name); }
        catch (ArgumentException e) { throw new SweepSpecException(Source, where, e.Message); }
    }

    JsonElement Value(object value, string where)
    {
        try { return SweepOptions.ToElement(value); }
        catch (ArgumentException e) { throw new SweepSpecException(Source, where, e.Message); }
    }

    // ------------------------------------------------------------------------------------------------------ JSON

    static readonly string[] TopLevel = { "preset", "task", "upscale", "precision", "inputs", "fixed", "grid", "points", "metrics", "save_images" };

    /// <summary>Reads a spec file; relative input paths are relative to the spec's folder.</summary>
    public static SweepSpec Load(string path)
    {
        string text;
        try { text = File.ReadAllText(path); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new FileNotFoundException($"{path}: cannot read the sweep spec ({e.Message})", path);
        }
        return Parse(text, path, Path.GetDirectoryName(Path.GetFullPath(path)));
    }

    /// <summary>
    /// A spec from JSON: <c>{"preset": "tiny", "task": "sr", "upscale": 4, "precision": "fp32", "inputs": ["a.png",
    /// {"lq": "b.png", "hq": "b_hq.png"}], "fixed": {"steps": 2}, "grid": {"g_scale": [0.1, 0.5]}, "points": [{"seed": 3}],
    /// "metrics": ["niqe"], "save_images": true}</c>. Every error names <paramref name="source"/> and the field.
    /// </summary>
    public static SweepSpec Parse(string json, string source = "spec", string? baseDir = null)
    {
        JsonNode? root;
        try { root = JsonNode.Parse(json, documentOptions: new JsonDocumentOptions { CommentHandling = JsonCommentHandling.Skip, AllowTrailingCommas = true }); }
        catch (JsonException e) { throw new SweepSpecException(source, $"line {e.LineNumber + 1}", $"not valid JSON ({e.Message.Split('.')[0]})"); }
        if (root is not JsonObject o) throw new SweepSpecException(source, "(top level)", "expected a JSON object {\"inputs\": …, \"grid\": …}");
        SweepSpecException Err(string field, string cause) => new(source, field, cause);
        foreach (var (k, _) in o)
            if (!TopLevel.Contains(k)) throw Err(k, $"unknown field (known: {string.Join(", ", TopLevel)})");

        string? Str(string field, JsonNode? n)
        {
            if (n is null) return null;
            if (n is JsonValue v && v.TryGetValue<string>(out var s)) return s;
            throw Err(field, $"expected a string (got {n.ToJsonString()})");
        }
        string Resolve(string p) => baseDir is null || Path.IsPathRooted(p) ? p : Path.GetFullPath(Path.Combine(baseDir, p));

        var spec = new SweepSpec { Source = source };
        if (o["preset"] is { } preset)
        {
            var name = Str("preset", preset)!;
            if (!Pipeline.Presets.All.Any(p => p.Name == name))
                throw Err("preset", $"unknown preset '{name}' (known: {string.Join(", ", Pipeline.Presets.All.Select(p => p.Name))})");
            spec = spec with { Preset = name };
        }
        if (o["task"] is { } task)
        {
            var t = Str("task", task)!;
            if (t is not ("sr" or "face" or "denoise")) throw Err("task", $"must be sr, face or denoise (got '{t}')");
            spec = spec with { Task = t };
        }
        if (o["upscale"] is { } up)
        {
            if (up is not JsonValue uv || !uv.TryGetValue<double>(out var u) || !double.IsFinite(u) || u <= 0)
                throw Err("upscale", $"expected a finite number above 0 (got {up.ToJsonString()})");
            spec = spec with { Upscale = u };
        }
        if (o["precision"] is { } prec)
        {
            var p = Str("precision", prec)!;
            if (p is not ("fp32" or "fp16" or "bf16")) throw Err("precision", $"must be fp32, fp16 or bf16 (got '{p}')");
            spec = spec with { Precision = p };
        }
        if (o["save_images"] is { } save)
        {
            if (save is not JsonValue sv || !sv.TryGetValue<bool>(out var b)) throw Err("save_images", $"expected true or false (got {save.ToJsonString()})");
            spec = spec with { SaveImages = b };
        }

        // inputs
        if (o["inputs"] is not JsonArray inputs || inputs.Count == 0)
            throw Err("inputs", "expected a non-empty list of image paths or {\"lq\": PATH, \"hq\": PATH} objects");
        var list = new List<SweepInput>();
        for (int i = 0; i < inputs.Count; i++)
        {
            var f = $"inputs[{i}]";
            switch (inputs[i])
            {
                case JsonValue v when v.TryGetValue<string>(out var p) && p.Length > 0:
                    list.Add(new SweepInput(Resolve(p)));
                    break;
                case JsonObject io:
                    foreach (var (k, _) in io)
                        if (k is not ("lq" or "hq")) throw Err($"{f}.{k}", "unknown field (known: lq, hq)");
                    var lq = Str($"{f}.lq", io["lq"]);
                    if (string.IsNullOrEmpty(lq)) throw Err($"{f}.lq", "missing: the degraded image's path");
                    var hq = Str($"{f}.hq", io["hq"]);
                    list.Add(new SweepInput(Resolve(lq), string.IsNullOrEmpty(hq) ? null : Resolve(hq)));
                    break;
                default:
                    throw Err(f, $"expected a path or {{\"lq\": PATH, \"hq\": PATH}} (got {inputs[i]?.ToJsonString() ?? "null"})");
            }
        }
        spec = spec with { Inputs = list };

        // option values
        IEnumerable<SweepValue> Values(JsonObject obj, string prefix)
        {
            foreach (var (k, v) in obj)
            {
                var where = $"{prefix}.{k}";
                if (!SweepOptions.IsKnown(k)) throw Err(where, $"unknown option '{k}' (known: {string.Join(", ", SweepOptions.Names)})");
                if (v is null or JsonArray or JsonObject) throw Err(where, $"expected a number, string or boolean (got {v?.ToJsonString() ?? "null"})");
                yield return new SweepValue(k, JsonSerializer.SerializeToElement(v), where);
            }
        }
        if (o["fixed"] is { } fixedNode)
        {
            if (fixedNode is not JsonObject fo) throw Err("fixed", "expected an object {\"option\": value, …}");
            spec = spec with { FixedValues = Values(fo, "fixed").ToArray() };
        }
        if (o["grid"] is { } gridNode)
        {
            if (gridNode is not JsonObject go) throw Err("grid", "expected an object {\"option\": [values], …}");
            var axes = new List<SweepAxis>();
            foreach (var (k, v) in go)
            {
                if (!SweepOptions.IsKnown(k)) throw Err($"grid.{k}", $"unknown option '{k}' (known: {string.Join(", ", SweepOptions.Names)})");
                if (v is not JsonArray arr || arr.Count == 0) throw Err($"grid.{k}", "expected a non-empty list of values");
                var vals = new List<SweepValue>();
                for (int i = 0; i < arr.Count; i++)
                {
                    if (arr[i] is null or JsonArray or JsonObject) throw Err($"grid.{k}[{i}]", $"expected a number, string or boolean (got {arr[i]?.ToJsonString() ?? "null"})");
                    vals.Add(new SweepValue(k, JsonSerializer.SerializeToElement(arr[i]), $"grid.{k}[{i}]"));
                }
                axes.Add(new SweepAxis(k, vals));
            }
            spec = spec with { Axes = axes };
        }
        if (o["points"] is { } pointsNode)
        {
            if (pointsNode is not JsonArray pa) throw Err("points", "expected a list of objects {\"option\": value, …}");
            var pts = new List<IReadOnlyList<SweepValue>>();
            for (int i = 0; i < pa.Count; i++)
            {
                if (pa[i] is not JsonObject po) throw Err($"points[{i}]", "expected an object {\"option\": value, …}");
                pts.Add(Values(po, $"points[{i}]").ToArray());
            }
            spec = spec with { Points = pts };
        }
        if (o["metrics"] is { } metricsNode)
        {
            if (metricsNode is not JsonArray ma) throw Err("metrics", "expected a list of metric names");
            var names = new List<string>();
            for (int i = 0; i < ma.Count; i++)
            {
                var n = Str($"metrics[{i}]", ma[i]) ?? throw Err($"metrics[{i}]", "expected a metric name");
                try { Lab.Metrics.Metric.Describe(n); }
                catch (ArgumentException e) { throw Err($"metrics[{i}]", e.Message); }
                names.Add(n.Trim().ToLowerInvariant());
            }
            spec = spec with { Metrics = names };
        }
        return spec;
    }

    /// <summary>The spec as JSON (the form <see cref="Parse"/> reads), for manifests.</summary>
    public JsonObject ToJson()
    {
        static JsonNode? V(JsonElement e) => JsonNode.Parse(e.GetRawText());
        var o = new JsonObject
        {
            ["preset"] = Preset, ["task"] = Task, ["upscale"] = Upscale, ["precision"] = Precision,
            ["inputs"] = new JsonArray(Inputs.Select(i => (JsonNode)new JsonObject { ["lq"] = i.Path, ["hq"] = i.Hq }).ToArray()),
            ["fixed"] = new JsonObject(FixedValues.Select(v => KeyValuePair.Create(v.Name, V(v.Value)))),
            ["grid"] = new JsonObject(Axes.Select(a => KeyValuePair.Create(a.Name, (JsonNode?)new JsonArray(a.Values.Select(v => V(v.Value)).ToArray())))),
            ["points"] = new JsonArray(Points.Select(p => (JsonNode)new JsonObject(p.Select(v => KeyValuePair.Create(v.Name, V(v.Value))))).ToArray()),
            ["metrics"] = new JsonArray(Metrics.Select(m => (JsonNode)m!).ToArray()),
            ["save_images"] = SaveImages,
        };
        if (Schedules.Count > 0)
            o["schedules"] = new JsonObject(Schedules.OrderBy(kv => kv.Key, StringComparer.Ordinal)
                .Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)SweepPlan.ScheduleFingerprint(kv.Value))));
        return o;
    }
}
