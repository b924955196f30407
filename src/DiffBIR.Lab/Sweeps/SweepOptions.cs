using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using DiffBIR.Lab.Guidance;
using DiffBIR.Lab.Pipeline;

namespace DiffBIR.Lab.Sweeps;

/// <summary>
/// Every option a sweep point can set, by the names of the <c>restore</c> command's settings (<c>g_scale</c> for
/// <c>--g-scale</c>, …), with plain values only: numbers, strings, booleans. <see cref="ToPipelineOptions"/> turns
/// them into the pipeline's options and restoration guidance (a guidance schedule multiplies <see cref="GScale"/>).
/// Defaults are the preset's (<see cref="From"/>).
/// </summary>
public sealed record SweepSettings
{
    public int Steps { get; init; } = 10;
    public string Sampler { get; init; } = "edm_dpm++_3m_sde";
    public double Cfg { get; init; } = 6.0;
    public bool RescaleCfg { get; init; }
    public double Strength { get; init; } = 1.0;
    public int NoiseAug { get; init; }
    /// <summary>noise or cond.</summary>
    public string StartPoint { get; init; } = "noise";
    public double SChurn { get; init; }
    public double STmin { get; init; }
    public double STmax { get; init; } = 300;
    public double SNoise { get; init; } = 1;
    public double Eta { get; init; } = 1;
    public int Order { get; init; } = 1;
    public long Seed { get; init; } = 231;
    public string PosPrompt { get; init; } = PipelineOptions.DefaultPosPrompt;
    public string NegPrompt { get; init; } = PipelineOptions.DefaultNegPrompt;
    /// <summary>none, mse or wmse.</summary>
    public string Guidance { get; init; } = "none";
    public double GScale { get; init; }
    public int GStart { get; init; } = 1001;
    public int GStop { get; init; } = -1;
    /// <summary>rgb or latent.</summary>
    public string GSpace { get; init; } = "rgb";
    public int GRepeat { get; init; } = 1;
    public int GPatch { get; init; } = 2;
    /// <summary>The gradient-map normalisation (<see cref="WeightMapNorm.Parse"/>): sum (official), sum:T, mean, max, percentile:Q.</summary>
    public string GNorm { get; init; } = "sum";
    /// <summary>constant, linear:A:B, cosine:A:B or piecewise:T=F,… (see <see cref="GuidanceSchedule.Parse"/>), or fn:NAME
    /// for a function given to <see cref="SweepSpec.Schedule"/>.</summary>
    public string GSchedule { get; init; } = "constant";
    /// <summary>Schedules given as functions (<see cref="SweepSpec.Schedule"/>), for <see cref="GSchedule"/> values "fn:NAME". Not an option.</summary>
    public IReadOnlyDictionary<string, GuidanceSchedule>? CustomSchedules { get; init; }

    /// <summary>The function schedule <see cref="GSchedule"/> names ("fn:NAME"), or null (a text form, or unknown).</summary>
    public GuidanceSchedule? CustomSchedule() =>
        GSchedule.StartsWith("fn:", StringComparison.Ordinal) && CustomSchedules is { } d && d.TryGetValue(GSchedule[3..], out var f) ? f : null;
    public bool CleanerTiled { get; init; }
    public int CleanerTileSize { get; init; } = 512;
    public int CleanerTileStride { get; init; } = 256;
    public bool VaeEncoderTiled { get; init; }
    public int VaeEncoderTileSize { get; init; } = 256;
    public bool VaeDecoderTiled { get; init; }
    public int VaeDecoderTileSize { get; init; } = 256;
    public bool CldmTiled { get; init; }
    public int CldmTileSize { get; init; } = 512;
    public int CldmTileStride { get; init; } = 256;

    /// <summary>The settings that reproduce <paramref name="o"/> (a preset's defaults); its guidance, if any, is not carried over.</summary>
    public static SweepSettings From(PipelineOptions o) => new()
    {
        Steps = o.Steps, Sampler = o.Sampler, Cfg = o.CfgScale, RescaleCfg = o.RescaleCfg, Strength = o.Strength,
        NoiseAug = o.NoiseAug, StartPoint = o.StartPointType == Pipeline.StartPoint.Cond ? "cond" : "noise",
        SChurn = o.SChurn, STmin = o.STmin, STmax = o.STmax, SNoise = o.SNoise, Eta = o.Eta, Order = o.Order, Seed = o.Seed,
        PosPrompt = o.PosPrompt, NegPrompt = o.NegPrompt,
        CleanerTiled = o.CleanerTiled, CleanerTileSize = o.CleanerTileSize, CleanerTileStride = o.CleanerTileStride,
        VaeEncoderTiled = o.VaeEncoderTiled, VaeEncoderTileSize = o.VaeEncoderTileSize,
        VaeDecoderTiled = o.VaeDecoderTiled, VaeDecoderTileSize = o.VaeDecoderTileSize,
        CldmTiled = o.CldmTiled, CldmTileSize = o.CldmTileSize, CldmTileStride = o.CldmTileStride,
    };

    /// <summary>The restoration guidance these settings describe (null for <c>none</c>).</summary>
    public RestorationGuidance? MakeGuidance()
    {
        if (Guidance == "none") return null;
        GuidanceSchedule? schedule;
        if (GSchedule.StartsWith("fn:", StringComparison.Ordinal))
            schedule = CustomSchedule() ?? throw new OptionException("g_schedule",
                $"no schedule function '{GSchedule[3..]}': define it with SweepSpec.Schedule(\"{GSchedule[3..]}\", fun t -> …) (a JSON spec cannot hold functions)");
        else
            try { schedule = GuidanceSchedule.Parse(GSchedule); }
            catch (FormatException e) { throw new OptionException("g_schedule", e.Message); }
        return RestorationGuidance.Create(Guidance, GScale, GStart, GStop, GSpace, GRepeat, schedule, GPatch, GNorm);
    }

    /// <summary>The pipeline options of these settings (noise: a seeded source of <see cref="Seed"/>).</summary>
    public PipelineOptions ToPipelineOptions() => new()
    {
        Steps = Steps, Sampler = Sampler, CfgScale = Cfg, RescaleCfg = RescaleCfg, Strength = Strength, NoiseAug = NoiseAug,
        StartPointType = StartPoint == "cond" ? Pipeline.StartPoint.Cond : Pipeline.StartPoint.Noise,
        SChurn = SChurn, STmin = STmin, STmax = STmax, SNoise = SNoise, Eta = Eta, Order = Order, Seed = Seed,
        PosPrompt = PosPrompt, NegPrompt = NegPrompt,
        CleanerTiled = CleanerTiled, CleanerTileSize = CleanerTileSize, CleanerTileStride = CleanerTileStride,
        VaeEncoderTiled = VaeEncoderTiled, VaeEncoderTileSize = VaeEncoderTileSize,
        VaeDecoderTiled = VaeDecoderTiled, VaeDecoderTileSize = VaeDecoderTileSize,
        CldmTiled = CldmTiled, CldmTileSize = CldmTileSize, CldmTileStride = CldmTileStride,
        Guidance = MakeGuidance(),
    };

    /// <summary>Every option by name, in <see cref="SweepOptions.Names"/> order (numbers, strings, booleans).</summary>
    public JsonObject ToJson()
    {
        var o = new JsonObject();
        foreach (var opt in SweepOptions.All) o[opt.Name] = opt.Get(this);
        return o;
    }
}

/// <summary>One sweepable option: its name, value kind, allowed values (for strings with a fixed set) and accessors.</summary>
public sealed record SweepOption(string Name, string Kind, Func<SweepSettings, JsonNode?> Get, Func<SweepSettings, JsonElement, SweepSettings> Set,
    IReadOnlyList<string>? Choices = null, string? Help = null);

/// <summary>
/// The sweepable options and their mapping onto <see cref="SweepSettings"/>. Names follow the <c>restore</c>
/// command's settings (snake_case): steps, sampler, cfg, strength, seed, guidance, g_scale, g_patch, g_schedule, …
/// An unknown name is an error that lists the known ones.
/// </summary>
public static class SweepOptions
{
    static double Num(JsonElement v) => v.ValueKind == JsonValueKind.Number && v.TryGetDouble(out var d) && double.IsFinite(d)
        ? d : throw new FormatException($"expected a number (got {v.GetRawText()})");

    static long Long(JsonElement v)
    {
        if (v.ValueKind == JsonValueKind.Number && v.TryGetInt64(out var l)) return l;
        if (v.ValueKind == JsonValueKind.Number && v.TryGetDouble(out var d) && Math.Floor(d) == d && Math.Abs(d) < 9e15) return (long)d;
        throw new FormatException($"expected an integer (got {v.GetRawText()})");
    }

    static int Int(JsonElement v)
    {
        var l = Long(v);
        return l is >= int.MinValue and <= int.MaxValue ? (int)l : throw new FormatException($"expected an integer (got {v.GetRawText()})");
    }

    static bool Bool(JsonElement v) => v.ValueKind switch
    {
        JsonValueKind.True => true,
        JsonValueKind.False => false,
        _ => throw new FormatException($"expected true or false (got {v.GetRawText()})"),
    };

    static string Str(JsonElement v, IReadOnlyList<string>? choices)
    {
        if (v.ValueKind != JsonValueKind.String) throw new FormatException($"expected a string (got {v.GetRawText()})");
        var s = v.GetString()!;
        if (choices != null && !choices.Contains(s)) throw new FormatException($"'{s}' is not one of {string.Join(", ", choices)}");
        return s;
    }

    static SweepOption I(string name, Func<SweepSettings, int> get, Func<SweepSettings, int, SweepSettings> set) =>
        new(name, "integer", s => get(s), (s, v) => set(s, Int(v)));
    static SweepOption L(string name, Func<SweepSettings, long> get, Func<SweepSettings, long, SweepSettings> set) =>
        new(name, "integer", s => get(s), (s, v) => set(s, Long(v)));
    static SweepOption D(string name, Func<SweepSettings, double> get, Func<SweepSettings, double, SweepSettings> set) =>
        new(name, "number", s => get(s), (s, v) => set(s, Num(v)));
    static SweepOption B(string name, Func<SweepSettings, bool> get, Func<SweepSettings, bool, SweepSettings> set) =>
        new(name, "boolean", s => get(s), (s, v) => set(s, Bool(v)));
    static SweepOption S(string name, Func<SweepSettings, string> get, Func<SweepSettings, string, SweepSettings> set, IReadOnlyList<string>? choices = null) =>
        new(name, "string", s => get(s), (s, v) => set(s, Str(v, choices)), choices);

    public static IReadOnlyList<SweepOption> All { get; } = new[]
    {
        S("sampler", s => s.Sampler, (s, v) => s with { Sampler = v }, Sampling.Samplers.Names.ToArray()),
        I("steps", s => s.Steps, (s, v) => s with { Steps = v }),
        D("cfg", s => s.Cfg, (s, v) => s with { Cfg = v }),
        B("rescale_cfg", s => s.RescaleCfg, (s, v) => s with { RescaleCfg = v }),
        D("strength", s => s.Strength, (s, v) => s with { Strength = v }),
        I("noise_aug", s => s.NoiseAug, (s, v) => s with { NoiseAug = v }),
        S("start_point", s => s.StartPoint, (s, v) => s with { StartPoint = v }, new[] { "noise", "cond" }),
        D("s_churn", s => s.SChurn, (s, v) => s with { SChurn = v }),
        D("s_tmin", s => s.STmin, (s, v) => s with { STmin = v }),
        D("s_tmax", s => s.STmax, (s, v) => s with { STmax = v }),
        D("s_noise", s => s.SNoise, (s, v) => s with { SNoise = v }),
        D("eta", s => s.Eta, (s, v) => s with { Eta = v }),
        I("order", s => s.Order, (s, v) => s with { Order = v }),
        L("seed", s => s.Seed, (s, v) => s with { Seed = v }),
        S("guidance", s => s.Guidance, (s, v) => s with { Guidance = v }, new[] { "none", "mse", "wmse" }),
        D("g_scale", s => s.GScale, (s, v) => s with { GScale = v }),
        I("g_start", s => s.GStart, (s, v) => s with { GStart = v }),
        I("g_stop", s => s.GStop, (s, v) => s with { GStop = v }),
        S("g_space", s => s.GSpace, (s, v) => s with { GSpace = v }, new[] { "rgb", "latent" }),
        I("g_repeat", s => s.GRepeat, (s, v) => s with { GRepeat = v }),
        I("g_patch", s => s.GPatch, (s, v) => s with { GPatch = v }),
        S("g_norm", s => s.GNorm, (s, v) => s with { GNorm = WeightMapNorm.Parse(v).ToString() }),
        S("g_schedule", s => s.GSchedule, (s, v) => { if (!v.StartsWith("fn:", StringComparison.Ordinal)) GuidanceSchedule.Parse(v); return s with { GSchedule = v }; }),
        S("pos_prompt", s => s.PosPrompt, (s, v) => s with { PosPrompt = v }),
        S("neg_prompt", s => s.NegPrompt, (s, v) => s with { NegPrompt = v }),
        B("cleaner_tiled", s => s.CleanerTiled, (s, v) => s with { CleanerTiled = v }),
        I("cleaner_tile_size", s => s.CleanerTileSize, (s, v) => s with { CleanerTileSize = v }),
        I("cleaner_tile_stride", s => s.CleanerTileStride, (s, v) => s with { CleanerTileStride = v }),
        B("vae_encoder_tiled", s => s.VaeEncoderTiled, (s, v) => s with { VaeEncoderTiled = v }),
        I("vae_encoder_tile_size", s => s.VaeEncoderTileSize, (s, v) => s with { VaeEncoderTileSize = v }),
        B("vae_decoder_tiled", s => s.VaeDecoderTiled, (s, v) => s with { VaeDecoderTiled = v }),
        I("vae_decoder_tile_size", s => s.VaeDecoderTileSize, (s, v) => s with { VaeDecoderTileSize = v }),
        B("cldm_tiled", s => s.CldmTiled, (s, v) => s with { CldmTiled = v }),
        I("cldm_tile_size", s => s.CldmTileSize, (s, v) => s with { CldmTileSize = v }),
        I("cldm_tile_stride", s => s.CldmTileStride, (s, v) => s with { CldmTileStride = v }),
    };

    /// <summary>Every option name, in table-column order.</summary>
    public static IReadOnlyList<string> Names { get; } = All.Select(o => o.Name).ToArray();

    static readonly Dictionary<string, SweepOption> ByName = All.ToDictionary(o => o.Name, StringComparer.Ordinal);

    /// <summary>The option <paramref name="name"/>, or an <see cref="ArgumentException"/> listing the known names.</summary>
    public static SweepOption Get(string name) => ByName.TryGetValue(name, out var o) ? o
        : throw new ArgumentException($"unknown option '{name}' (known: {string.Join(", ", Names)})");

    public static bool IsKnown(string name) => ByName.ContainsKey(name);

    /// <summary>A JSON element of a plain .NET value (number, string, bool), as F# and C# callers give them.</summary>
    public static JsonElement ToElement(object? value) => value switch
    {
        JsonElement e => e,
        JsonNode n => JsonSerializer.SerializeToElement(n),
        null => throw new ArgumentException("option values may not be null"),
        string or bool or int or long or double or float or decimal or short or byte or uint or ulong => JsonSerializer.SerializeToElement(value, value.GetType()),
        _ => throw new ArgumentException($"option values are numbers, strings or booleans (got a {value.GetType().Name})"),
    };

    /// <summary>A value as the results table writes it (invariant culture, round-trip doubles).</summary>
    internal static string Text(JsonNode? v) => v switch
    {
        null => "",
        JsonValue jv when jv.TryGetValue<double>(out var d) => d.ToString("R", CultureInfo.InvariantCulture),
        JsonValue jv when jv.TryGetValue<string>(out var s) => s,
        _ => v.ToJsonString(),
    };
}
