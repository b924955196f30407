using System.ComponentModel;
using System.Diagnostics;
using DiffBIR.Lab.Metrics;
using Spectre.Console;
using Spectre.Console.Cli;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Cli.Commands;

public sealed class BenchMetricsSettings : CommandSettings
{
    [CommandOption("--size <PX>")] [Description("Side of the square random image (default 512).")]
    public int Size { get; set; } = 512;
    [CommandOption("--images <N>")] [Description("Timed images per metric, one at a time, after one warm-up image (default 3).")]
    public int Images { get; set; } = 3;
    [CommandOption("--metrics <NAMES>")] [Description("Comma-separated (default: every metric).")]
    public string? Metrics { get; set; }
    [CommandOption("--threads <N>")] [Description("torch intra-op threads (default: libtorch's choice).")]
    public int? Threads { get; set; }
}

/// <summary>
/// <c>diffbir-lab bench metrics</c>: images per second of each metric on the CPU, full-size networks with seeded
/// RANDOM weights (the speed does not depend on the values; the numbers they give mean nothing). A benchmark, not a test.
/// </summary>
public sealed class BenchMetricsCommand : Command<BenchMetricsSettings>
{
    public override int Execute(CommandContext context, BenchMetricsSettings s, CancellationToken ct)
    {
        if (s.Threads is int t) torch.set_num_threads(t);
        var names = s.Metrics?.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries) ?? Metric.Names.ToArray();
        AnsiConsole.WriteLine($"bench metrics: {s.Size}×{s.Size} RGB, {s.Images} timed image(s) after 1 warm-up, CPU, {torch.get_num_threads()} thread(s), "
                              + "learned metrics with RANDOM weights (timing only)");
        var table = new Table().Border(TableBorder.Simple).AddColumns("metric", "kind", "build s", "s/image", "images/s");
        var gen = new Generator(1234);
        using var img = torch.randint(0, 256, new long[] { 1, s.Size, s.Size, 3 }, ScalarType.Byte, generator: gen);
        using var reference = torch.randint(0, 256, new long[] { 1, s.Size, s.Size, 3 }, ScalarType.Byte, generator: gen);
        foreach (var n in names)
        {
            ct.ThrowIfCancellationRequested();
            var build = Stopwatch.StartNew();
            using var m = Metric.Get(n, randomWeightsForTests: true);
            double buildS = build.Elapsed.TotalSeconds;
            var r = m.Info.NeedsReference ? reference : null;
            m.Score(img, r); // warm-up
            var sw = Stopwatch.StartNew();
            for (int i = 0; i < s.Images; i++) m.Score(img, r);
            double per = sw.Elapsed.TotalSeconds / s.Images;
            table.AddRow(Markup.Escape(MetricsTable.Column(m)), m.Info.NeedsReference ? "FR" : "NR", $"{buildS:F2}", $"{per:F3}", $"{1 / per:F2}");
            AnsiConsole.WriteLine($"{MetricsTable.Column(m)}: {per:F3} s/image, {1 / per:F2} images/s");
        }
        AnsiConsole.Write(table);
        return 0;
    }
}
