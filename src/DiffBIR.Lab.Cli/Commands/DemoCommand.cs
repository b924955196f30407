using System.ComponentModel;
using System.Text.Json;
using DiffBIR.Lab.IO;
using DiffBIR.Lab.Parity;
using Spectre.Console;
using Spectre.Console.Cli;
using TorchSharp;

namespace DiffBIR.Lab.Cli.Commands;

public sealed class DemoSettings : CommandSettings
{
    [CommandOption("--fixtures <DIR>")]
    [Description("The golden fixtures folder (default ../shared/fixtures); skipped when absent.")]
    public string Fixtures { get; set; } = Path.Combine("..", "shared", "fixtures");

    [CommandOption("-o|--output <DIR>")]
    [Description("Where to write the demo input, the restoration, its manifest and the demo manifest (default out/demo).")]
    public string Output { get; set; } = Path.Combine("out", "demo");

    [CommandOption("--weights <DIR>")]
    [Description("The weights folder (default weights/).")]
    public string Weights { get; set; } = "weights";

    [CommandOption("--no-sweep")]
    [Description("Skip the guidance sweep (trained tiny preset, 6 points) and its quality–fidelity curve.")]
    public bool NoSweep { get; set; }

    [CommandOption("--no-parity")]
    [Description("Skip the parity run over the fixtures.")]
    public bool NoParity { get; set; }
}

/// <summary>
/// The README's main job: restores a degraded test card with the best preset whose weights are present (v2.1, v2, v1),
/// or with the built-in tiny preset when weights/ has none (the tiny DiffBIR of weights/tiny, trained on procedural
/// images by this project: real behaviour in seconds on a CPU, not a model for photos), then runs the parity runner
/// over every fixture. Then the lab end to end: a guidance-scale × patch-size sweep with the trained tiny preset, its
/// results table and its quality–fidelity curve (niqe-lab vs PSNR to HQ).
/// </summary>
public sealed class DemoCommand : Command<DemoSettings>
{
    static string Num(System.Text.Json.Nodes.JsonObject row, string key) =>
        DiffBIR.Lab.Interactive.SweepCharts.Number(row, key) is var x && double.IsFinite(x) ? x.ToString("F2", System.Globalization.CultureInfo.InvariantCulture) : "–";

    public override int Execute(CommandContext context, DemoSettings s, CancellationToken ct)
    {
        var sw = System.Diagnostics.Stopwatch.StartNew();
        AnsiConsole.Write(new Rule("[bold]DiffBIR.Lab demo[/]"));
        try { Directory.CreateDirectory(s.Output); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        { throw new ArgumentException($"--output: cannot create {s.Output}: {e.Message}"); }

        // 1. A degraded input: the test card, downscaled ×4 and JPEG-compressed.
        var input = Path.Combine(s.Output, "input");
        Directory.CreateDirectory(input);
        using (var scope = torch.NewDisposeScope())
        {
            var card = TestImages.Card(128, 160);
            var small = DiffBIR.Lab.Pipeline.ImageOps.ResizeBicubic(card, 32, 40).clamp(0, 1);
            var degraded = DiffBIR.Lab.Degradation.FirstOrderDegradation.JpegCompress(small, 60);
            ImageIO.Save(Path.Combine(input, "testcard_lq.png"), degraded, Quantization.Round);
        }

        // 2. Restore it (×4 BSR) with `restore`'s own code: preset chosen from what weights/ holds.
        var restoreSettings = new RestoreSettings
        {
            Input = input, Output = Path.Combine(s.Output, "restored"), Task = "sr", Weights = s.Weights,
            Steps = 4, Sampler = "edm_dpm++_3m_sde",
        };
        int restoreCode = new RestoreCommand().Execute(context, restoreSettings, ct);

        // 3. The lab: a guidance sweep on a held-out procedural image with the trained tiny preset (no download):
        //    3 scales × 2 gradient-map patch sizes, fidelity against HQ, the weight-free niqe-lab as the quality axis.
        string? sweepDir = null, curve = null, curvePng = null;
        int sweepCode = 0;
        if (!s.NoSweep)
        {
            sweepDir = Path.Combine(s.Output, "sweep");
            var sweepInput = Path.Combine(s.Output, "sweep-input");
            Directory.CreateDirectory(sweepInput);
            string hqPath = Path.Combine(sweepInput, "procedural_hq.png"), lqPath = Path.Combine(sweepInput, "procedural_lq.png");
            using (var scope = torch.NewDisposeScope())
            {
                var hq = DiffBIR.Lab.Data.ProceduralImages.Generate(2026, DiffBIR.Lab.Data.TinyTrainingData.HeldOutStart, 128).unsqueeze(0);
                var small = DiffBIR.Lab.Pipeline.ImageOps.ResizeBicubic(hq, 32, 32).clamp(0, 1);
                ImageIO.Save(hqPath, hq, Quantization.Round);
                ImageIO.Save(lqPath, DiffBIR.Lab.Degradation.FirstOrderDegradation.JpegCompress(small, 60), Quantization.Round);
            }
            var spec = DiffBIR.Lab.Sweeps.SweepSpec.On(lqPath, hqPath).WithPreset("tiny", "sr", 4)
                .Fixed("steps", 4).Fixed("guidance", "wmse").Fixed("seed", 231)
                .Grid("g_scale", 0.0, 0.1, 1.0).Grid("g_patch", 1, 4)
                .WithMetrics(DiffBIR.Lab.Metrics.Metric.NiqeLabName);
            AnsiConsole.MarkupLine("\nsweep: trained tiny preset, guidance scale × patch size on a held-out procedural image:");
            using var tiny = DiffBIR.Lab.Pipeline.Presets.Build("tiny", "sr", s.Weights);
            var summary = DiffBIR.Lab.Sweeps.SweepRunner.Run(tiny, spec, sweepDir, new DiffBIR.Lab.Sweeps.SweepRunOptions { WeightsDir = s.Weights, Cancellation = ct });
            foreach (var r in summary.Rows)
                AnsiConsole.MarkupLine(Markup.Escape($"  s={r["g_scale"]} patch={r["g_patch"]}: PSNR to HQ {Num(r, "psnr_hq")} dB, to I_RM {Num(r, "psnr_irm")} dB, niqe-lab {Num(r, DiffBIR.Lab.Metrics.Metric.NiqeLabName)}"));
            var charts = SweepCommand.WriteCharts(spec, summary.Rows, sweepDir, png: true,
                note: n => AnsiConsole.MarkupLine(Markup.Escape("  " + n)));
            curve = charts.FirstOrDefault();
            curvePng = charts.FirstOrDefault(c => c.EndsWith(".png", StringComparison.Ordinal));
            sweepCode = summary.Failed > 0 ? 1 : 0;
        }

        // 4. Parity against the official code.
        List<CaseReport> reports = new();
        if (!s.NoParity && Directory.Exists(s.Fixtures))
        {
            AnsiConsole.MarkupLine($"\nparity over {Markup.Escape(Path.GetFullPath(s.Fixtures))}:");
            reports = ParityCommand.Run(ParityRunner.FindFixtures(new[] { s.Fixtures }), null, false, ct);
        }
        else if (!s.NoParity)
            AnsiConsole.MarkupLine("[yellow]fixtures folder not found; skipping parity[/]");

        var manifest = new
        {
            tool = "diffbir-lab demo", version = typeof(ParityRunner).Assembly.GetName().Version?.ToString(),
            torchsharp = typeof(torch).Assembly.GetName().Version?.ToString(), device = "cpu",
            date = DateTime.UtcNow.ToString("o"), elapsed_seconds = sw.Elapsed.TotalSeconds,
            restore_exit_code = restoreCode,
            sweep = sweepDir is null ? null : Path.Combine(sweepDir, DiffBIR.Lab.Sweeps.ResultsTable.CsvName), quality_fidelity_curve = curve, quality_fidelity_png = curvePng,
            restored = Path.Combine(restoreSettings.Output, "testcard_lq.png"),
            parity = reports.Select(r => new { @case = r.Case, file = Path.GetFileName(r.File), status = r.Status.ToString(), worst_max_rel = double.IsFinite(r.WorstRelBanded) ? r.WorstRelBanded : (double?)null, worst_max_rel_absolute_band = double.IsFinite(r.WorstRelAbsoluteBand) ? r.WorstRelAbsoluteBand : (double?)null }),
        };
        var manifestPath = Path.Combine(s.Output, "manifest.json");
        AtomicFile.WriteAllText(manifestPath, JsonSerializer.Serialize(manifest, new JsonSerializerOptions { WriteIndented = true }));
        AnsiConsole.MarkupLine($"\nwrote {Markup.Escape(restoreSettings.Output)}/ and {Markup.Escape(manifestPath)} in {sw.Elapsed.TotalSeconds:F1}s");
        if (sweepDir is not null)
            AnsiConsole.MarkupLine($"sweep table {Markup.Escape(Path.Combine(sweepDir, DiffBIR.Lab.Sweeps.ResultsTable.CsvName))}" + (curve is null ? "" : $", quality–fidelity curve {Markup.Escape(curve)}") + (curvePng is null ? "" : $" and {Markup.Escape(curvePng)}"));
        bool anyFailed = restoreCode != 0 || sweepCode != 0 || reports.Any(r => r.Status is CaseStatus.Fail or CaseStatus.Error);
        return anyFailed ? 1 : 0;
    }
}
