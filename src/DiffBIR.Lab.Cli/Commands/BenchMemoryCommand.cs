using System.ComponentModel;
using System.Globalization;
using DiffBIR.Lab.Pipeline;
using Spectre.Console;
using Spectre.Console.Cli;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Cli.Commands;

public sealed class BenchMemorySettings : CommandSettings
{
    [CommandOption("--runs <N>")] [Description("Consecutive restorations in this one process (default 50).")]
    public int Runs { get; set; } = 50;
    [CommandOption("--size <PX>")] [Description("Side of the random input image (default 32).")]
    public int Size { get; set; } = 32;
    [CommandOption("--steps <N>")] public int Steps { get; set; } = 4;
}

/// <summary>
/// <c>diffbir-lab bench memory</c>: runs the tiny pipeline N times in one process and prints, per run, the process RSS
/// and the number of live native tensors. A leak shows as a count or an RSS that keeps climbing; a benchmark, not a
/// test (the test suite checks the tensor count over a few runs).
/// </summary>
public sealed class BenchMemoryCommand : Command<BenchMemorySettings>
{
    public sealed record Sample(int Run, long RssBytes, long LiveTensors, double Seconds);

    /// <summary>The measurement itself (used by the test suite too).</summary>
    public static List<Sample> Measure(int runs, int size, int steps, Action<Sample>? report = null)
    {
        using var preset = Presets.Build("tiny-random", "sr", Path.Combine(Path.GetTempPath(), "diffbir-lab-no-weights"), new BuildOptions { Upscale = 4 });
        using var lq = torch.randint(0, 256, new long[] { 1, size, size, 3 }, ScalarType.Byte, generator: new Generator(7));
        var samples = new List<Sample>();
        for (int i = 1; i <= runs; i++)
        {
            var sw = System.Diagnostics.Stopwatch.StartNew();
            using (var result = preset.Restore(lq, new PipelineOptions { Steps = steps, Sampler = "edm_dpm++_3m_sde", Seed = i })) { }
            GC.Collect(); GC.WaitForPendingFinalizers();
            var s = new Sample(i, BenchBuildCommand.Rss(), DisposeScopeManager.Statistics.ThreadTotalLiveCount, sw.Elapsed.TotalSeconds);
            samples.Add(s);
            report?.Invoke(s);
        }
        return samples;
    }

    public override int Execute(CommandContext context, BenchMemorySettings s, CancellationToken ct)
    {
        AnsiConsole.MarkupLine($"tiny pipeline, {s.Size}×{s.Size} → ×4, {s.Steps} steps, {s.Runs} runs in one process");
        var samples = Measure(s.Runs, s.Size, s.Steps, x =>
            AnsiConsole.WriteLine($"run {x.Run,3}: RSS {x.RssBytes / 1048576.0,8:F1} MiB, live tensors {x.LiveTensors,6}, {x.Seconds:F2} s"));
        var first = samples[Math.Min(1, samples.Count - 1)];
        var last = samples[^1];
        AnsiConsole.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"from run {first.Run} to run {last.Run}: RSS {(last.RssBytes - first.RssBytes) / 1048576.0:+0.0;-0.0} MiB, live tensors {last.LiveTensors - first.LiveTensors:+0;-0}"));
        return 0;
    }
}
