using System.ComponentModel;
using System.Diagnostics;
using System.Globalization;
using DiffBIR.Lab.IO;
using DiffBIR.Lab.Metrics;
using Spectre.Console;
using Spectre.Console.Cli;
using TorchSharp;

namespace DiffBIR.Lab.Cli.Commands;

public sealed class MetricsSettings : CommandSettings
{
    [CommandOption("--pred <DIR>")]
    [Description("Folder of images to assess (restored outputs).")]
    public string? Pred { get; set; }

    [CommandOption("--ref <DIR>")]
    [Description("Folder of reference images, paired with --pred by file-name stem (needed by full-reference metrics).")]
    public string? Ref { get; set; }

    [CommandOption("--metrics <NAMES>")]
    [Description("Comma-separated: psnr, ssim, lpips, lpips-vgg, musiq, musiq-ava, clipiqa, clipiqa+, maniqa. Default: psnr,ssim,lpips,musiq,clipiqa,maniqa — those whose weights are missing are skipped with a note (named explicitly, they are an error).")]
    public string? Metrics { get; set; }

    [CommandOption("-o|--output <FILE>")]
    [Description("The CSV to write (default metrics.csv).")]
    public string Output { get; set; } = "metrics.csv";

    [CommandOption("--weights <DIR>")]
    [Description("The weights folder (default weights/).")]
    public string Weights { get; set; } = "weights";

    [CommandOption("--random-weights")]
    [Description("Learned metrics with seeded RANDOM weights (tests and timing only; the columns say so). Not a measurement.")]
    public bool RandomWeights { get; set; }
}

/// <summary>
/// <c>diffbir-lab metrics</c>: image-quality metrics over a folder of predictions (and references), one CSV row per
/// image plus the means. Exit 0 done; 1 some files were unpaired or failed (the rest are in the table); 2 nothing to
/// do or bad options.
/// </summary>
public sealed class MetricsCommand : Command<MetricsSettings>
{
    public static readonly string[] DefaultMetrics = { "psnr", "ssim", "lpips", "musiq", "clipiqa", "maniqa" };

    public override int Execute(CommandContext context, MetricsSettings s, CancellationToken ct)
    {
        if (s.Pred is null) throw new ArgumentException("--pred: give the folder of images to assess");
        bool explicitList = s.Metrics is not null;
        var names = (s.Metrics?.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries) ?? DefaultMetrics)
            .Select(n => Metric.Describe(n).Name).Distinct().ToList();
        if (names.Count == 0) throw new ArgumentException("--metrics: no metric named");
        if (s.Ref is null)
        {
            var fr = names.Where(n => Metric.Describe(n).NeedsReference).ToList();
            if (explicitList && fr.Count > 0)
                throw new ArgumentException($"--ref: {string.Join(", ", fr)} compare with a reference; give --ref DIR or only no-reference metrics");
            if (fr.Count > 0) AnsiConsole.WriteLine($"note: no --ref, so the full-reference metrics ({string.Join(", ", fr)}) are skipped");
            names = names.Except(fr).ToList();
        }
        if (!s.RandomWeights)
        {
            var unavailable = names.Select(n => (n, a: Metric.Availability(n, s.Weights))).Where(x => !x.a.Available).ToList();
            if (explicitList && unavailable.Count > 0)
                throw new MetricUnavailableException(unavailable[0].n, unavailable[0].a.Reason);
            foreach (var (n, a) in unavailable) AnsiConsole.WriteLine($"note: {n} skipped — {a.Reason}");
            names = names.Except(unavailable.Select(x => x.n)).ToList();
        }
        if (names.Count == 0) { CliErrors.Print("no metric can run (see the notes above)"); return 2; }

        var pairing = MetricsTable.Pair(s.Pred, s.Ref);
        foreach (var u in pairing.Unpaired) Console.Error.WriteLine("warning: unpaired: " + u);
        if (pairing.Pairs.Count == 0)
        {
            CliErrors.Print(s.Ref is null ? $"{s.Pred}: no images" : $"nothing pairs between {s.Pred} and {s.Ref} (images are paired by file-name stem)");
            return 2;
        }

        var metrics = new List<Metric>();
        try
        {
            foreach (var n in names) metrics.Add(Metric.Get(n, s.Weights, randomWeightsForTests: s.RandomWeights));
            if (s.RandomWeights)
                AnsiConsole.MarkupLine("[yellow]RANDOM WEIGHTS[/]: the learned metrics are untrained networks (--random-weights); their numbers mean nothing.");
            var values = new List<double[]>();
            int failed = 0;
            void Run(Action<string> progress)
            {
                foreach (var p in pairing.Pairs)
                {
                    ct.ThrowIfCancellationRequested();
                    var row = Enumerable.Repeat(double.NaN, metrics.Count).ToArray();
                    using var scope = torch.NewDisposeScope();
                    try
                    {
                        var pred = ImageIO.Load(p.Pred).Image;
                        var refImg = p.Ref is null ? null : ImageIO.Load(p.Ref).Image;
                        for (int j = 0; j < metrics.Count; j++)
                        {
                            try { row[j] = metrics[j].Score(pred, metrics[j].Info.NeedsReference ? refImg : null)[0]; }
                            catch (ArgumentException e) { failed++; Console.Error.WriteLine($"warning: {p.Name}: {metrics[j].Name}: {e.Message}"); }
                        }
                    }
                    catch (ImageFileException e) { failed++; Console.Error.WriteLine("warning: " + e.Message); }
                    values.Add(row);
                    progress(p.Name);
                }
            }
            var sw = Stopwatch.StartNew();
            if (Console.IsOutputRedirected) Run(_ => { });
            else
                AnsiConsole.Progress().AutoClear(true)
                    .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new ElapsedTimeColumn(), new RemainingTimeColumn())
                    .Start(pctx =>
                    {
                        var task = pctx.AddTask("metrics", maxValue: pairing.Pairs.Count);
                        Run(name => { task.Description = Markup.Escape(name); task.Increment(1); });
                    });

            var columns = metrics.Select(MetricsTable.Column).ToList();
            AtomicFile.WriteAllText(s.Output, MetricsTable.Csv(columns, pairing.Pairs, values));

            var table = new Table().Border(TableBorder.Simple).AddColumn("image");
            foreach (var m in metrics)
                table.AddColumn(new TableColumn(Markup.Escape(MetricsTable.Column(m)) + (m.Info.HigherIsBetter ? " ↑" : " ↓")).RightAligned());
            string F(double v) => double.IsNaN(v) ? "-" : v.ToString("0.0000", CultureInfo.InvariantCulture);
            for (int i = 0; i < pairing.Pairs.Count; i++)
                table.AddRow(new[] { Markup.Escape(pairing.Pairs[i].Name) }.Concat(values[i].Select(F)).ToArray());
            table.AddRow(new[] { "[bold]mean[/]" }.Concat(MetricsTable.Means(metrics.Count, values).Select(F)).ToArray());
            AnsiConsole.Write(table);
            AnsiConsole.WriteLine($"{pairing.Pairs.Count} image(s), {metrics.Count} metric(s) in {sw.Elapsed.TotalSeconds:F1} s → {s.Output}");
            return pairing.Unpaired.Count > 0 || failed > 0 ? 1 : 0;
        }
        finally { foreach (var m in metrics) m.Dispose(); }
    }
}
