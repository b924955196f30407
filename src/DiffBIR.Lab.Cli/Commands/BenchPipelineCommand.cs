using System.ComponentModel;
using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using DiffBIR.Lab.Guidance;
using DiffBIR.Lab.Models;
using DiffBIR.Lab.Models.Clip;
using DiffBIR.Lab.Models.Stage1;
using DiffBIR.Lab.Pipeline;
using Spectre.Console;
using Spectre.Console.Cli;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Cli.Commands;

public sealed class BenchPipelineSettings : CommandSettings
{
    [CommandOption("--device <D>")] [Description("cuda (default) or cpu.")]
    public string Device { get; set; } = "cuda";
    [CommandOption("--precisions <LIST>")] [Description("Comma-separated: fp32,fp16 (default both).")]
    public string Precisions { get; set; } = "fp32,fp16";
    [CommandOption("--guidance <LIST>")] [Description("Comma-separated: none,wmse (default both; wmse = weighted MSE in rgb space, s = 0.5).")]
    public string Guidance { get; set; } = "none,wmse";
    [CommandOption("--size <PX>")] [Description("Side of the square input (default 128; ×4 → 512).")]
    public int Size { get; set; } = 128;
    [CommandOption("--steps <N>")] public int Steps { get; set; } = 50;
    [CommandOption("--cfg <S>")] public double Cfg { get; set; } = 4.0;
    [CommandOption("--sampler <NAME>")] public string Sampler { get; set; } = "spaced";
    [CommandOption("--runs <N>")] [Description("Timed runs per setting after one warm-up run (default 3; the median is reported).")]
    public int Runs { get; set; } = 3;
    [CommandOption("--peak-tflops-fp32 <X>")] [Description("The card's dense fp32 peak for the floor (default 67, H100/H200 SXM without TF32).")]
    public double PeakFp32 { get; set; } = 67;
    [CommandOption("--peak-tflops-fp16 <X>")] [Description("The card's dense fp16 tensor-core peak (default 989, H100/H200 SXM).")]
    public double PeakFp16 { get; set; } = 989;
    [CommandOption("--json <FILE>")] [Description("Also write the results as JSON.")]
    public string? Json { get; set; }
}

/// <summary>
/// <c>diffbir-lab bench pipeline</c>: times the full-size v2 pipeline (BSRNet ×4 + ControlLDM) with random weights —
/// time does not depend on the values — at the issue's settings: 128×128 input, ×4, spaced, 50 steps, cfg 4 with the
/// default negative prompt, fp32 and fp16, without and with weighted-MSE guidance in rgb space. Prints time per
/// image and per step, peak GPU memory (nvidia-smi, whole process, when available), and the model FLOPs of one run
/// (convolutions and linear layers, counted with forward hooks; attention score/value products are not counted) with
/// the floor time they imply on the card.
/// </summary>
public sealed class BenchPipelineCommand : Command<BenchPipelineSettings>
{
    sealed record Result(string Precision, string Guidance, double SecondsPerImage, double SecondsPerStep, double? PeakGpuMiB, double Tflop, double FloorSeconds);

    public override int Execute(CommandContext context, BenchPipelineSettings s, CancellationToken ct)
    {
        var device = s.Device == "cuda" ? torch.CUDA : torch.CPU;
        if (s.Device == "cuda" && !torch.cuda.is_available())
        {
            AnsiConsole.MarkupLine("[red]CUDA is not available to TorchSharp here[/] (see README, 'Using a GPU'); use --device cpu to try the script");
            return 2;
        }
        var results = new List<Result>();
        foreach (var precision in s.Precisions.Split(',', StringSplitOptions.RemoveEmptyEntries))
        {
            var sw = Stopwatch.StartNew();
            using var pipe = Build(device, precision);
            AnsiConsole.MarkupLine($"built the full-size v2 pipeline ({precision}, random weights) on {s.Device} in {sw.Elapsed.TotalSeconds:F1} s");
            using var lq = torch.randint(0, 256, new long[] { 1, s.Size, s.Size, 3 }, ScalarType.Byte, generator: new Generator(1));
            foreach (var g in s.Guidance.Split(',', StringSplitOptions.RemoveEmptyEntries))
            {
                var options = new PipelineOptions
                {
                    Steps = s.Steps, Sampler = s.Sampler, CfgScale = s.Cfg, Seed = 231,
                    Guidance = g == "wmse" ? new WeightedMseGuidance { Scale = 0.5, Space = GuidanceSpace.Rgb } : null,
                };
                // Warm-up run, counting FLOPs.
                double flops = CountFlops(pipe, () => { using var _ = pipe.Run(lq, options); });
                Sync(device);
                var times = new List<double>();
                double? peak = null;
                for (int r = 0; r < s.Runs; r++)
                {
                    using var monitor = GpuMemoryMonitor.Start(device);
                    var t0 = Stopwatch.StartNew();
                    using (var _ = pipe.Run(lq, options)) { }
                    Sync(device);
                    times.Add(t0.Elapsed.TotalSeconds);
                    peak = monitor?.PeakMiB is double p ? Math.Max(peak ?? 0, p) : peak;
                }
                times.Sort();
                double median = times[times.Count / 2];
                double peakTflops = precision == "fp32" ? s.PeakFp32 : s.PeakFp16;
                var res = new Result(precision, g, median, median / s.Steps, peak, flops / 1e12, flops / (peakTflops * 1e12));
                results.Add(res);
                AnsiConsole.MarkupLine(string.Create(CultureInfo.InvariantCulture,
                    $"  {precision} guidance={g}: {res.SecondsPerImage:F2} s/image, {res.SecondsPerStep * 1000:F1} ms/step, peak {(peak is null ? "n/a" : $"{peak:F0} MiB")}, {res.Tflop:F1} TFLOP (floor {res.FloorSeconds:F2} s)"));
                ct.ThrowIfCancellationRequested();
            }
        }
        var table = new Table().Border(TableBorder.Simple).AddColumns("precision", "guidance", "s/image", "ms/step", "peak GPU MiB", "TFLOP", "floor s");
        foreach (var r in results)
            table.AddRow(r.Precision, r.Guidance, r.SecondsPerImage.ToString("F2", CultureInfo.InvariantCulture),
                (r.SecondsPerStep * 1000).ToString("F1", CultureInfo.InvariantCulture), r.PeakGpuMiB?.ToString("F0", CultureInfo.InvariantCulture) ?? "n/a",
                r.Tflop.ToString("F1", CultureInfo.InvariantCulture), r.FloorSeconds.ToString("F2", CultureInfo.InvariantCulture));
        AnsiConsole.Write(table);
        AnsiConsole.MarkupLine($"settings: {s.Size}×{s.Size} → ×4, {Markup.Escape(s.Sampler)} {s.Steps} steps, cfg {s.Cfg}, default negative prompt, {s.Runs} timed runs (median), {DateTime.UtcNow:yyyy-MM-dd}");
        if (s.Json != null)
            AtomicFile.WriteAllText(s.Json, JsonSerializer.Serialize(new { settings = s, date = DateTime.UtcNow, results }, new JsonSerializerOptions { WriteIndented = true }));
        return 0;
    }

    static void Sync(Device d) { if (d.type == DeviceType.CUDA) torch.cuda.synchronize(); }

    /// <summary>The v2 BSR pipeline at full size with seeded random weights (timing does not depend on them).</summary>
    static RestorationPipeline Build(Device device, string precision)
    {
        var cldm = new ControlLDM(ControlLdmConfig.Sd21, ClipTokenizer.ByteLevel());
        Presets.RandomInit(cldm, 1234);
        var cleaner = new BSRNetCleaner(new RRDBNet(RRDBNetConfig.Full), 4);
        Presets.RandomInit(cleaner.Network, 1235);
        cldm.eval();
        if (device.type != DeviceType.CPU) { cldm.to(device); cleaner.Network.to(device); }
        if (precision == "fp16") cldm.CastDtype(ScalarType.Float16);
        else if (precision == "bf16") cldm.CastDtype(ScalarType.BFloat16);
        return new RestorationPipeline(cleaner, cldm, Diffusion.NoiseSchedule.V2) { NotATrainedModel = true };
    }

    /// <summary>FLOPs of convolutions and linear layers during <paramref name="run"/> (2 per multiply-add).</summary>
    static double CountFlops(RestorationPipeline pipe, Action run)
    {
        double flops = 0;
        var removers = new List<Action>();
        foreach (var root in new nn.Module[] { pipe.Cldm, pipe.Cleaner.Network })
            foreach (var (_, m) in root.named_modules())
            {
                if (m is Conv2d conv)
                {
                    var hc = conv.register_forward_hook((mod, input, output) =>
                    {
                        var w = conv.weight!.shape;   // [Cout, Cin/groups, kh, kw]
                        flops += 2.0 * output.numel() * w[1] * w[2] * w[3];
                        return output;
                    });
                    removers.Add(() => hc.remove());
                }
                else if (m is Linear lin)
                {
                    var hl = lin.register_forward_hook((mod, input, output) =>
                    {
                        flops += 2.0 * output.numel() * lin.weight!.shape[1];
                        return output;
                    });
                    removers.Add(() => hl.remove());
                }
            }
        try { run(); }
        finally { foreach (var r in removers) r(); }
        return flops;
    }

    /// <summary>Samples nvidia-smi's memory.used every 100 ms (whole GPU); null when not on CUDA or no nvidia-smi.</summary>
    sealed class GpuMemoryMonitor : IDisposable
    {
        readonly CancellationTokenSource _stop = new();
        readonly Task _loop;
        double _baseline = double.NaN, _peak;
        public double? PeakMiB => double.IsNaN(_baseline) ? null : _peak - _baseline;

        GpuMemoryMonitor()
        {
            _loop = Task.Run(async () =>
            {
                while (!_stop.IsCancellationRequested)
                {
                    var used = Query();
                    if (used is double u)
                    {
                        if (double.IsNaN(_baseline)) _baseline = 0; // report absolute use: the process holds the models too
                        _peak = Math.Max(_peak, u);
                    }
                    try { await Task.Delay(100, _stop.Token); } catch (TaskCanceledException) { }
                }
            });
        }

        public static GpuMemoryMonitor? Start(Device d) => d.type == DeviceType.CUDA && Query() is not null ? new GpuMemoryMonitor() : null;

        static double? Query()
        {
            try
            {
                var psi = new ProcessStartInfo("nvidia-smi", "--query-gpu=memory.used --format=csv,noheader,nounits")
                { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
                using var p = Process.Start(psi)!;
                var text = p.StandardOutput.ReadToEnd();
                p.WaitForExit();
                return double.TryParse(text.Split('\n')[0].Trim(), NumberStyles.Float, CultureInfo.InvariantCulture, out var v) ? v : null;
            }
            catch (System.ComponentModel.Win32Exception) { return null; }
        }

        public void Dispose() { _stop.Cancel(); try { _loop.Wait(1000); } catch (AggregateException) { } }
    }
}
