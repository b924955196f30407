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
        AnsiConsole.WriteLine($"load average at start: {LoadAverage()} (the machine may be shared: CPU s/image is the steadier number)");
        var table = new Table().Border(TableBorder.Simple).AddColumns("metric", "kind", "build s", "wall s/image", "images/s", "CPU s/image");
        var proc = Process.GetCurrentProcess();
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
            proc.Refresh();
            var cpu0 = proc.TotalProcessorTime;
            var sw = Stopwatch.StartNew();
            for (int i = 0; i < s.Images; i++) m.Score(img, r);
            double per = sw.Elapsed.TotalSeconds / s.Images;
            proc.Refresh();
            double cpuPer = (proc.TotalProcessorTime - cpu0).TotalSeconds / s.Images;
            table.AddRow(Markup.Escape(MetricsTable.Column(m)), m.Info.NeedsReference ? "FR" : "NR", $"{buildS:F2}", $"{per:F3}", $"{1 / per:F3}", $"{cpuPer:F3}");
            AnsiConsole.WriteLine($"{MetricsTable.Column(m)}: {per:F3} s/image wall, {1 / per:F3} images/s, {cpuPer:F3} CPU s/image");
        }
        AnsiConsole.Write(table);
        AnsiConsole.WriteLine($"load average at end: {LoadAverage()}");
        return 0;
    }

    static string LoadAverage() => File.Exists("/proc/loadavg") ? string.Join(' ', File.ReadAllText("/proc/loadavg").Split(' ').Take(3)) : "n/a";
}
