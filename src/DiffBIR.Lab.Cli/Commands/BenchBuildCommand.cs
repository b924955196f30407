using System.ComponentModel;
using System.Diagnostics;
using System.Globalization;
using DiffBIR.Lab.Models.StableDiffusion;
using Spectre.Console;
using Spectre.Console.Cli;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Cli.Commands;

public sealed class BenchBuildSettings : CommandSettings
{
    [CommandOption("--forward <LATENT>")]
    [Description("Also time one ControlLDM forward (ControlNet + UNet) on a LATENT×LATENT latent (64 = a 512 px image); 0 = skip.")]
    public int ForwardLatent { get; set; }

    [CommandOption("--threads <N>")]
    [Description("libtorch intra-op threads (default: libtorch's choice).")]
    public int Threads { get; set; }
}

/// <summary>
/// <c>diffbir-lab bench build</c>: builds the full-size networks of ControlLDM (UNet, IRControlNet, VAE, CLIP text encoder) on the CPU in float32 (real allocation and default
/// initialisation, not the meta device) and reports the time, parameter counts and process memory (RSS). A
/// benchmark, not a test: it answers "does the model fit in this machine and how long does start-up take".
/// </summary>
public sealed class BenchBuildCommand : Command<BenchBuildSettings>
{
    sealed record Row(string Name, long Parameters, double Seconds, long RssAfter);

    public override int Execute(CommandContext context, BenchBuildSettings s, CancellationToken ct)
    {
        if (s.Threads > 0) torch.set_num_threads(s.Threads);
        var rows = new List<Row>();
        var rss0 = Rss();
        AnsiConsole.MarkupLine($"threads: {torch.get_num_threads()}   RSS at start: {Gb(rss0)}");

        var sw = Stopwatch.StartNew();
        using var unet = new UNetModel(UNetConfig.Sd21);
        rows.Add(new Row("unet (SD 2.1)", Count(unet), sw.Elapsed.TotalSeconds, Rss()));
        ct.ThrowIfCancellationRequested();

        sw.Restart();
        using var controlnet = new ControlNet(UNetConfig.Sd21);
        rows.Add(new Row("controlnet (IRControlNet)", Count(controlnet), sw.Elapsed.TotalSeconds, Rss()));
        ct.ThrowIfCancellationRequested();

        // The rest of ControlLDM: the KL-f8 VAE and the OpenCLIP ViT-H text encoder.
        sw.Restart();
        using var vae = new DiffBIR.Lab.Models.Vae.AutoencoderKL(DiffBIR.Lab.Models.Vae.VaeConfig.Sd21);
        rows.Add(new Row("vae (KL-f8)", Count(vae), sw.Elapsed.TotalSeconds, Rss()));
        sw.Restart();
        using var clip = new DiffBIR.Lab.Models.Clip.FrozenOpenClipEmbedder(DiffBIR.Lab.Models.Clip.ClipConfig.VitH14);
        rows.Add(new Row("clip (OpenCLIP ViT-H text)", Count(clip), sw.Elapsed.TotalSeconds, Rss()));

        var table = new Table().Border(TableBorder.Simple).AddColumns("network", "parameters", "build s", "RSS after");
        foreach (var r in rows)
            table.AddRow(r.Name, r.Parameters.ToString("N0", CultureInfo.InvariantCulture), r.Seconds.ToString("0.00", CultureInfo.InvariantCulture), Gb(r.RssAfter));
        table.AddRow("total", rows.Sum(r => r.Parameters).ToString("N0", CultureInfo.InvariantCulture),
            rows.Sum(r => r.Seconds).ToString("0.00", CultureInfo.InvariantCulture), Gb(Rss()));
        AnsiConsole.Write(table);

        if (s.ForwardLatent > 0)
        {
            unet.eval(); controlnet.eval();
            using var scope = torch.NewDisposeScope();
            using var _ = torch.no_grad();
            int n = s.ForwardLatent;
            var x = torch.randn(1, 4, n, n);
            var hint = torch.randn(1, 4, n, n);
            var t = torch.tensor(new long[] { 500 });
            var ctx = torch.randn(1, 77, UNetConfig.Sd21.ContextDim);
            sw.Restart();
            using var control = controlnet.forward(x, hint, t, ctx);
            var tc = sw.Elapsed.TotalSeconds;
            sw.Restart();
            var eps = unet.forward(x, t, ctx, control);
            var tu = sw.Elapsed.TotalSeconds;
            AnsiConsole.WriteLine($"forward on a {n}×{n} latent: controlnet {tc:0.00} s, unet {tu:0.00} s, output [{string.Join(", ", eps.shape)}], RSS {Gb(Rss())}");
        }
        AnsiConsole.MarkupLine($"peak RSS: {Gb(PeakRss())}");
        return 0;
    }

    static long Count(nn.Module m) => m.parameters().Sum(p => p.numel());

    static string Gb(long bytes) => (bytes / (1024.0 * 1024 * 1024)).ToString("0.00", CultureInfo.InvariantCulture) + " GiB";

    internal static long Rss() => ProcessMemory.Rss();

    static long PeakRss() => ProcessMemory.PeakRss();
}
