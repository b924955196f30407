using System.ComponentModel;
using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using DiffBIR.Lab.Diagnostics;
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
    [CommandOption("--runs <N>")] [Description("Timed runs per setting after one warm-up run (default 3; the median is reported). 0 reports the warm-up run itself (for slow machines).")]
    public int Runs { get; set; } = 3;
    [CommandOption("--matmul-size <N>")] [Description("Side of the square matmul timed for the machine's peak (default 2048).")]
    public int MatmulSize { get; set; } = 2048;
    [CommandOption("--json <FILE>")] [Description("Also write the results as JSON.")]
    public string? Json { get; set; }
}

/// <summary>
/// <c>diffbir-lab bench pipeline</c>: times the full-size v2 pipeline (BSRNet ×4 + ControlLDM) with random weights —
/// time does not depend on the values — at the issue's settings: 128×128 input, ×4, spaced, 50 steps, cfg 4 with the
/// default negative prompt, fp32 and fp16, without and with weighted-MSE guidance in rgb space. Prints the memory of
/// the build (peak, after, weights per network), then for the warm-up run the peak RSS of each stage (stage 1, VAE
/// encoder + CLIP, sampling, VAE decoder; VmHWM restarted per stage) with glibc's malloc figures and a breakdown,
/// time per image and per step, peak GPU memory (nvidia-smi, whole process, when available), and the FLOPs of one
/// run counted by <see cref="FlopCounter"/> during the warm-up run (every convolution, linear layer and attention
/// product QKᵀ / A·V of every network, per network; 1 multiply-add = 2 FLOP; norms, activations and other elementwise
/// work are not counted), the FLOP/s achieved, and its fraction of the machine's matmul peak measured in the same
/// process with the same libtorch (best of five square matmuls in the run's dtype).
/// </summary>
public sealed class BenchPipelineCommand : Command<BenchPipelineSettings>
{
    sealed record Result(string Precision, string Guidance, double SecondsPerImage, double SecondsPerStep, double? PeakGpuMiB, double PeakRssGiB,
        double Tflop, double AchievedTflops, double MatmulPeakTflops, double FractionOfPeak, IReadOnlyDictionary<string, double> GmacPerNetwork);

    public override int Execute(CommandContext context, BenchPipelineSettings s, CancellationToken ct)
    {
        var device = s.Device == "cuda" ? torch.CUDA : torch.CPU;
        if (s.Device == "cuda" && !torch.cuda.is_available())
        {
            AnsiConsole.MarkupLine("[red]CUDA is not available to TorchSharp here[/] (see README, 'Using a GPU'); use --device cpu to try the script");
            return 2;
        }
        if (s.Runs < 0) throw new ArgumentException($"--runs must be 0 or more (got {s.Runs})");
        var results = new List<Result>();
        foreach (var precision in s.Precisions.Split(',', StringSplitOptions.RemoveEmptyEntries))
        {
            var sw = Stopwatch.StartNew();
            long rssStart = ProcessMemory.Rss();
            bool resettable = ProcessMemory.ResetPeak();
            using var pipe = Build(device, precision);
            long buildPeak = ProcessMemory.PeakRss();
            long rssBuilt = ProcessMemory.Rss();
            AnsiConsole.MarkupLine(string.Create(CultureInfo.InvariantCulture,
                $"built the full-size v2 pipeline ({precision}, random weights) on {s.Device} in {sw.Elapsed.TotalSeconds:F1} s; RSS {ProcessMemory.GiB(rssStart)} before, peak {ProcessMemory.GiB(buildPeak)} while building, {ProcessMemory.GiB(rssBuilt)} after"));
            var weights = WeightBytes(pipe);
            AnsiConsole.MarkupLine("  weights: " + string.Join(", ", weights.Select(kv => $"{kv.Key} {ProcessMemory.GiB(kv.Value)}")) +
                $" = {ProcessMemory.GiB(weights.Values.Sum())}");
            using var lq = torch.randint(0, 256, new long[] { 1, s.Size, s.Size, 3 }, ScalarType.Byte, generator: new Generator(1));
            var peakDtype = precision == "fp16" && device.type == DeviceType.CUDA ? ScalarType.Float16
                : precision == "bf16" && device.type == DeviceType.CUDA ? ScalarType.BFloat16 : ScalarType.Float32;
            double matmulPeak = MatmulPeakFlops(device, peakDtype, s.MatmulSize);
            AnsiConsole.MarkupLine(string.Create(CultureInfo.InvariantCulture,
                $"  matmul peak ({s.MatmulSize}², {peakDtype}, best of 5, same libtorch and threads): {matmulPeak / 1e9:F1} GFLOP/s"));
            foreach (var g in s.Guidance.Split(',', StringSplitOptions.RemoveEmptyEntries))
            {
                var options = new PipelineOptions
                {
                    Steps = s.Steps, Sampler = s.Sampler, CfgScale = s.Cfg, Seed = 231,
                    Guidance = g == "wmse" ? new WeightedMseGuidance { Scale = 0.5, Space = GuidanceSpace.Rgb } : null,
                };
                // Warm-up run, counting FLOPs and the memory of each stage.
                var stages = new StageMemory(resettable);
                var tw = Stopwatch.StartNew();
                var counted = CountFlops(pipe, () => { using var _ = pipe.Run(lq, options, stages.Observe); Sync(device); });
                double warmup = tw.Elapsed.TotalSeconds;
                double flops = counted.Flops;
                stages.End("finish (colour fix, uint8)");
                stages.Print(weights.Values.Sum(), rssStart);
                var times = new List<double>();
                if (s.Runs == 0) times.Add(warmup);
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
                double runPeak = stages.Rows.Count > 0 ? stages.Rows.Max(r => r.PeakBytes) / (1024.0 * 1024 * 1024) : 0;
                var perNetwork = counted.Roots.ToDictionary(r => r, r => counted.MacsOfRoot(r) / 1e9);
                var res = new Result(precision, g, median, median / s.Steps, peak, Math.Max(runPeak, buildPeak / (1024.0 * 1024 * 1024)),
                    flops / 1e12, flops / median / 1e12, matmulPeak / 1e12, flops / median / matmulPeak, perNetwork);
                results.Add(res);
                AnsiConsole.MarkupLine(string.Create(CultureInfo.InvariantCulture,
                    $"  {precision} guidance={g}: {res.SecondsPerImage:F2} s/image, {res.SecondsPerStep * 1000:F1} ms/step, peak GPU {(peak is null ? "n/a" : $"{peak:F0} MiB")}, peak RSS {res.PeakRssGiB:F2} GiB"));
                AnsiConsole.MarkupLine(string.Create(CultureInfo.InvariantCulture,
                    $"    {res.Tflop:F2} TFLOP counted ({string.Join(", ", perNetwork.Select(kv => $"{kv.Key} {kv.Value:F1}"))} G MAC), {res.AchievedTflops * 1000:F1} GFLOP/s achieved = {res.FractionOfPeak:P1} of the measured matmul peak"));
                if (counted.NotCalled.Count > 0)
                    AnsiConsole.MarkupLine($"    [grey]countable layers that did not run: {counted.NotCalled.Count} (first: {Markup.Escape(counted.NotCalled[0])})[/]");
                ct.ThrowIfCancellationRequested();
            }
        }
        var table = new Table().Border(TableBorder.Simple).AddColumns("precision", "guidance", "s/image", "ms/step", "peak GPU MiB", "peak RSS GiB",
            "TFLOP", "achieved GFLOP/s", "matmul peak GFLOP/s", "% of peak");
        string F(double v, string f) => v.ToString(f, CultureInfo.InvariantCulture);
        foreach (var r in results)
            table.AddRow(r.Precision, r.Guidance, F(r.SecondsPerImage, "F2"), F(r.SecondsPerStep * 1000, "F1"),
                r.PeakGpuMiB is double p ? F(p, "F0") : "n/a", F(r.PeakRssGiB, "F2"),
                F(r.Tflop, "F2"), F(r.AchievedTflops * 1000, "F1"), F(r.MatmulPeakTflops * 1000, "F1"), F(r.FractionOfPeak * 100, "F1"));
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

    /// <summary>Multiply-adds of every network during <paramref name="run"/>, per network (see <see cref="FlopCounter"/>).</summary>
    static FlopReport CountFlops(RestorationPipeline pipe, Action run)
    {
        var vae = pipe.Cldm.vae.named_children().ToDictionary(c => c.name, c => c.module);
        using var counter = new FlopCounter(
            ("stage 1", pipe.Cleaner.Network), ("CLIP", pipe.Cldm.clip),
            ("VAE encoder", vae["encoder"]), ("VAE encoder", vae["quant_conv"]),
            ("ControlNet", pipe.Cldm.controlnet), ("UNet", pipe.Cldm.unet),
            ("VAE decoder", vae["post_quant_conv"]), ("VAE decoder", vae["decoder"]));
        run();
        return counter.Report();
    }

    /// <summary>
    /// The machine's matmul throughput in FLOP/s with this libtorch: the best of 5 timed n×n products (after one
    /// warm-up), 2n³ FLOP each — the practical ceiling the pipeline's FLOP/s is compared with.
    /// </summary>
    static double MatmulPeakFlops(Device device, ScalarType dtype, int n)
    {
        using var scope = torch.NewDisposeScope();
        using var gen = new Generator(7);
        var a = torch.randn(new long[] { n, n }, generator: gen).to(dtype).to(device);
        var b = torch.randn(new long[] { n, n }, generator: gen).to(dtype).to(device);
        using (var _ = a.matmul(b)) Sync(device);
        double best = double.MaxValue;
        for (int i = 0; i < 5; i++)
        {
            var t0 = Stopwatch.StartNew();
            using (var _ = a.matmul(b)) Sync(device);
            best = Math.Min(best, t0.Elapsed.TotalSeconds);
        }
        return 2.0 * n * n * n / best;
    }

    /// <summary>Bytes of parameters and buffers per network (each tensor counted once).</summary>
    static Dictionary<string, long> WeightBytes(RestorationPipeline pipe)
    {
        var seen = new HashSet<IntPtr>();
        long Bytes(nn.Module m) => m.parameters().Cast<Tensor>().Concat(m.buffers())
            .Where(t => seen.Add(t.Handle)).Sum(t => t.numel() * t.element_size());
        return new Dictionary<string, long>
        {
            ["stage 1"] = Bytes(pipe.Cleaner.Network), ["UNet"] = Bytes(pipe.Cldm.unet), ["ControlNet"] = Bytes(pipe.Cldm.controlnet),
            ["VAE"] = Bytes(pipe.Cldm.vae), ["CLIP"] = Bytes(pipe.Cldm.clip),
        };
    }

    /// <summary>
    /// Peak and end RSS of each stage of one pipeline run, from the pipeline's own events: "stage1" ends stage 1,
    /// "c_img" ends the VAE encoder + CLIP (both prompts), the first step ends nothing (sampling runs to "z"), "decoded"
    /// ends the VAE decoder. The peak of a stage is VmHWM restarted at the stage's start (/proc/self/clear_refs); where
    /// that is refused every peak is the process's high-water mark so far. Also glibc's malloc statistics at each end.
    /// </summary>
    sealed class StageMemory
    {
        public sealed record Row(string Stage, long PeakBytes, long EndBytes, long StartBytes, (long InUse, long FreeInHeap, long Mmapped)? Malloc);
        public List<Row> Rows { get; } = new();
        readonly bool _resettable;
        long _start;

        public StageMemory(bool resettable) { _resettable = resettable; ProcessMemory.ResetPeak(); _start = ProcessMemory.Rss(); }

        public void Observe(PipelineEvent e)
        {
            switch (e.Stage)
            {
                case "stage1": End("stage 1 (BSRNet ×4)"); break;
                case "c_img": End("encode (VAE encoder) + CLIP (2 prompts)"); break;
                case "z": End("sampling (UNet + ControlNet, CFG)"); break;
                case "decoded": End("decode (VAE decoder)"); break;
            }
        }

        public void End(string stage)
        {
            long end = ProcessMemory.Rss();
            Rows.Add(new Row(stage, ProcessMemory.PeakRss(), end, _start, ProcessMemory.Malloc()));
            ProcessMemory.ResetPeak();
            _start = ProcessMemory.Rss();
        }

        public void Print(long weightBytes, long rssBeforeBuild)
        {
            var t = new Table().Border(TableBorder.Simple).AddColumns("stage", "peak RSS", "RSS at start", "RSS at end", "peak − start", "malloc in use", "malloc free (kept)");
            foreach (var r in Rows)
                t.AddRow(Markup.Escape(r.Stage), ProcessMemory.GiB(r.PeakBytes), ProcessMemory.GiB(r.StartBytes), ProcessMemory.GiB(r.EndBytes),
                    ProcessMemory.GiB(r.PeakBytes - r.StartBytes), r.Malloc is { } m ? ProcessMemory.GiB(m.InUse) : "n/a", r.Malloc is { } m2 ? ProcessMemory.GiB(m2.FreeInHeap) : "n/a");
            AnsiConsole.Write(t);
            long peak = Rows.Max(r => r.PeakBytes);
            AnsiConsole.MarkupLine(string.Create(CultureInfo.InvariantCulture,
                $"  breakdown at the run's peak ({ProcessMemory.GiB(peak)}): weights {ProcessMemory.GiB(weightBytes)}, runtime before the build (CLR, libtorch) {ProcessMemory.GiB(rssBeforeBuild)}, the rest (activations, allocator caches, workspace) {ProcessMemory.GiB(peak - weightBytes - rssBeforeBuild)}{(_resettable ? "" : " [peaks are cumulative: clear_refs refused]")}"));
        }
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
