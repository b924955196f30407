using System.ComponentModel;
using System.Globalization;
using DiffBIR.Lab.Pipeline;
using DiffBIR.Lab.Sweeps;
using Spectre.Console;
using Spectre.Console.Cli;
using TorchSharp;

namespace DiffBIR.Lab.Cli.Commands;

public sealed class SweepCommandSettings : CommandSettings
{
    [CommandArgument(0, "<SPEC>")] [Description("The sweep spec (JSON): inputs, fixed options, grid and/or points, metrics. See README, 'Sweeps'.")]
    public string Spec { get; set; } = "";
    [CommandOption("-o|--output <DIR>")] [Description("Where results.csv, results.jsonl, images/ and manifest.json go. A rerun skips the points already there.")]
    public string Output { get; set; } = "";
    [CommandOption("--shard <I/N>")] [Description("Run only points k with k mod N = I (default: SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT, else all).")]
    public string? Shard { get; set; }
    [CommandOption("--preset <PRESET>")] [Description("v1, v2, v2.1, tiny or custom (default: the spec's, else v2.1 when its weights are present, else tiny).")]
    public string? Preset { get; set; }
    [CommandOption("--weights <DIR>")] [Description("The weights folder (default weights/).")]
    public string Weights { get; set; } = "weights";
    [CommandOption("--device <D>")] [Description("cpu (default) or cuda.")]
    public string Device { get; set; } = "cpu";
    [CommandOption("--batch-size <N>")] [Description("Consecutive points that differ only in their seed and guidance settings (scale, schedule, window, patch size, normalisation) run as one batch of up to N (default 1), each with its own seed and guidance. Equal to one at a time up to float rounding.")]
    public int BatchSize { get; set; } = 1;
    [CommandOption("--threads <N>")] [Description("CPU threads of libtorch (default: all cores; recorded in every manifest).")]
    public int? Threads { get; set; }

    public override ValidationResult Validate()
    {
        if (string.IsNullOrWhiteSpace(Output)) return ValidationResult.Error("-o: give the output folder");
        if (BatchSize < 1) return ValidationResult.Error($"--batch-size: must be ≥ 1 (got {BatchSize})");
        if (Threads is < 1 or > 1024) return ValidationResult.Error($"--threads: must be in 1..1024 (got {Threads})");
        if (Device is not ("cpu" or "cuda")) return ValidationResult.Error("--device: must be cpu or cuda");
        return ValidationResult.Success();
    }
}

/// <summary>
/// <c>diffbir-lab sweep SPEC.json -o DIR</c>: runs a sweep (<see cref="SweepRunner"/>) with a progress line per point
/// on stderr. Exit 0 every point of the shard done; 1 some points diverged (their rows say so); 2 bad spec or
/// options; 130 interrupted (a rerun continues).
/// </summary>
public sealed class SweepCommand : Command<SweepCommandSettings>
{
    public override int Execute(CommandContext context, SweepCommandSettings s, CancellationToken ct)
    {
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(ct);
        ConsoleCancelEventHandler onCancel = (_, e) => { e.Cancel = true; cts.Cancel(); Console.Error.WriteLine("sweep: stopping after the current step…"); };
        Console.CancelKeyPress += onCancel;
        try { return Run(s, cts.Token); }
        // a results table of another sweep in -o, or a folder another process is writing to: the user's to fix
        catch (Exception e) when (e is InvalidDataException || e is IOException and not (FileNotFoundException or DirectoryNotFoundException))
        {
            throw new ArgumentException(e.Message);
        }
        finally { Console.CancelKeyPress -= onCancel; }
    }

    static string ChoosePreset(SweepCommandSettings s, SweepSpec spec)
    {
        if (s.Preset != null) { Presets.Get(s.Preset); return s.Preset; }
        return spec.Preset ?? Presets.ChooseInstalled(s.Weights, spec.Task);
    }

    static int Run(SweepCommandSettings s, CancellationToken ct)
    {
        if (!File.Exists(s.Spec)) throw new FileNotFoundException($"{s.Spec}: no such sweep spec file", s.Spec);
        if (File.Exists(s.Output)) throw new ArgumentException($"-o {s.Output}: is a file; give a folder for the results");
        var spec = SweepSpec.Load(s.Spec);
        var presetName = ChoosePreset(s, spec);
        if (presetName == "custom") throw new ArgumentException("--preset custom: sweeps support the named presets (v1, v2, v2.1, tiny)");
        spec = spec with { Preset = presetName };
        var shard = s.Shard is null ? SweepShard.FromEnvironment() : SweepShard.Parse(s.Shard);
        var device = s.Device == "cuda" ? torch.CUDA : torch.CPU;
        if (s.Device == "cuda" && !torch.cuda.is_available())
            throw new ArgumentException("--device cuda: CUDA is not available to TorchSharp here (see README, 'Using a GPU')");
        int threads = s.Threads ?? Environment.ProcessorCount;
        torch.set_num_threads(threads);
        var build = new BuildOptions
        {
            Upscale = spec.EffectiveUpscale,
            Precision = Presets.ParsePrecision(spec.Precision),
            Device = device,
        };
        // the spec is expanded (and every value checked) before any network is built
        var points = SweepPlan.Expand(spec, presetName, Presets.Get(presetName).Defaults);
        int inShard = points.Count(shard.Contains);
        Console.Error.WriteLine($"sweep: {points.Count} points ({spec.Inputs.Count} input(s)), shard {shard}: {inShard}; preset {presetName}, task {spec.Task}, ×{spec.EffectiveUpscale}, {spec.Precision} on {s.Device}, {threads} threads → {Path.GetFullPath(s.Output)}");
        if (presetName == "tiny-random") Console.Error.WriteLine("sweep: tiny-random preset: random fixture-sized networks, NOT a trained model — outputs only exercise the pipeline");
        else if (presetName == "tiny") Console.Error.WriteLine("sweep: tiny preset: the small DiffBIR trained by this project on procedural images (docs/tiny-preset.md) — not a model for photos");
        using var preset = Presets.Build(presetName, spec.Task, s.Weights, build);
        var summary = SweepRunner.Run(preset, spec, s.Output, new SweepRunOptions
        {
            Shard = shard, WeightsDir = s.Weights, Device = s.Device, Cancellation = ct, BatchSize = s.BatchSize,
            Progress = p => Console.Error.WriteLine(ProgressLine(p)),
        });
        Console.Error.WriteLine($"sweep: {summary.Done} done, {summary.Skipped} already there, {summary.Failed} diverged{(summary.Cancelled ? ", interrupted" : "")}; " +
                                $"{summary.Rows.Count} rows in {Path.Combine(s.Output, ResultsTable.CsvName)}");
        foreach (var chart in WriteCharts(spec, summary.Rows, s.Output, png: true, note: n => Console.Error.WriteLine($"sweep: {n}")))
            Console.Error.WriteLine($"sweep: chart {chart}");
        if (summary.Cancelled) return 130;
        return summary.Failed > 0 ? 1 : 0;
    }

    /// <summary>
    /// The quality–fidelity curve of a finished table (standalone HTML, plotly.js inlined): x = the spec's first
    /// no-reference metric, y = PSNR against HQ (else against I_RM), one line per combination of the swept options
    /// other than g_scale, points labelled with g_scale. Nothing is written without a no-reference metric. With
    /// <paramref name="png"/> also a PNG of it where a headless Chromium is on PATH; <paramref name="note"/> hears why not.
    /// </summary>
    public static IReadOnlyList<string> WriteCharts(SweepSpec spec, IReadOnlyList<System.Text.Json.Nodes.JsonObject> rows, string outDir,
        bool png = false, Action<string>? note = null)
    {
        var written = new List<string>();
        var quality = spec.Metrics.FirstOrDefault(m => DiffBIR.Lab.Metrics.Metric.Describe(m).Kind == DiffBIR.Lab.Metrics.MetricKind.NoReference);
        if (quality is null || rows.Count < 2) return written;
        quality = DiffBIR.Lab.Metrics.Metric.Describe(quality).Name;
        string fidelity = rows.Any(r => r.TryGetPropertyValue("psnr_hq", out var v) && v is not null) ? "psnr_hq" : "psnr_irm";
        var seriesBy = spec.Axes.Select(a => a.Name).Where(n => n != "g_scale").ToArray();
        var path = Path.Combine(outDir, "quality_fidelity.html");
        if (DiffBIR.Lab.Interactive.SweepCharts.SaveQualityFidelity(rows, quality, fidelity, seriesBy, "g_scale", path))
        {
            written.Add(path);
            if (png)
            {
                var r = DiffBIR.Lab.Interactive.SweepCharts.SaveQualityFidelityPng(rows, quality, fidelity, seriesBy, "g_scale", Path.ChangeExtension(path, ".png"));
                if (r.IsOk) written.Add(r.ResultValue);
                else note?.Invoke($"no PNG of the curve: {r.ErrorValue}");
            }
        }
        return written;
    }

    static string ProgressLine(SweepProgress p)
    {
        int finished = p.Done + p.Failed + p.Skipped;
        if (p.Point is null) return $"sweep: {finished}/{p.Total} points done before this run";
        var eta = p.Remaining is { } r ? $", ETA {r:hh\\:mm\\:ss}" : "";
        var status = (string?)p.Row?["status"] ?? "";
        return $"sweep: {finished}/{p.Total} points{eta} · {p.Point.Id} {p.Point.Label}" +
               (status == "ok" ? $" ({p.Row?["seconds"]} s)" : $" — {status}");
    }
}

public sealed class SweepMergeSettings : CommandSettings
{
    [CommandArgument(0, "<DIR>")] [Description("Sweep output folders (shards) to join.")]
    public string[] Folders { get; set; } = Array.Empty<string>();
    [CommandOption("-o|--output <DIR>")] [Description("Where the joined results.csv and results.jsonl go.")]
    public string Output { get; set; } = "";

    public override ValidationResult Validate() =>
        string.IsNullOrWhiteSpace(Output) ? ValidationResult.Error("-o: give the output folder") : ValidationResult.Success();
}

/// <summary><c>diffbir-lab sweep merge DIR… -o OUT</c>: joins shard tables (one row per point id; conflicting duplicates refused).</summary>
public sealed class SweepMergeCommand : Command<SweepMergeSettings>
{
    public override int Execute(CommandContext context, SweepMergeSettings s, CancellationToken ct)
    {
        foreach (var f in s.Folders)
            if (!Directory.Exists(f)) throw new DirectoryNotFoundException($"{f}: no such sweep folder");
        if (File.Exists(s.Output)) throw new ArgumentException($"-o {s.Output}: is a file; give a folder");
        try
        {
            int n = ResultsTable.Merge(s.Folders, s.Output);
            Console.Error.WriteLine($"sweep merge: {n} rows from {s.Folders.Length} folder(s) → {Path.Combine(s.Output, ResultsTable.CsvName)}");
            return 0;
        }
        catch (InvalidDataException e) { throw new ArgumentException(e.Message); }
    }
}
