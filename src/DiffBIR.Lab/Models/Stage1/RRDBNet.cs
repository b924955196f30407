using System.Text.Json.Nodes;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Models.Stage1;

/// <summary>
/// Constructor arguments of <see cref="RRDBNet"/> (official <c>diffbir.model.bsrnet.RRDBNet(in_nc, out_nc, nf, nb, gc, sf)</c>).
/// </summary>
/// <param name="InNc">Input channels (<c>in_nc</c>).</param>
/// <param name="OutNc">Output channels (<c>out_nc</c>).</param>
/// <param name="Nf">Trunk feature channels (<c>nf</c>).</param>
/// <param name="Nb">Number of RRDB blocks in the trunk (<c>nb</c>).</param>
/// <param name="Gc">Growth channels of each dense block (<c>gc</c>).</param>
/// <param name="Sf">Upscale factor (<c>sf</c>): 4 uses two nearest-×2 steps, anything else one.</param>
public sealed record RRDBNetConfig(int InNc = 3, int OutNc = 3, int Nf = 64, int Nb = 23, int Gc = 32, int Sf = 4)
{
    /// <summary>The released BSRNet (configs/inference/bsrnet.yaml, weights BSRNet.pth).</summary>
    public static RRDBNetConfig Full { get; } = new();

    /// <summary>Reads the official constructor arguments (JSON object); missing keys take the official defaults.</summary>
    public static RRDBNetConfig FromJson(JsonNode node)
    {
        var o = node.AsObject();
        ConfigJson.RejectUnknown(o, "RRDBNet", new[] { "in_nc", "out_nc", "nf", "nb", "gc", "sf" });
        // The class defaults equal the yaml, so one default serves both.
        return new RRDBNetConfig(
            ConfigJson.Int(o, "in_nc", 3), ConfigJson.Int(o, "out_nc", 3), ConfigJson.Int(o, "nf", 64),
            ConfigJson.Int(o, "nb", 23), ConfigJson.Int(o, "gc", 32), ConfigJson.Int(o, "sf", 4));
    }
}

/// <summary>Residual dense block with five 3×3 convs: each sees the concatenation of all earlier features (ESRGAN).</summary>
public sealed class ResidualDenseBlock_5C : nn.Module<Tensor, Tensor>
{
    private readonly Conv2d conv1, conv2, conv3, conv4, conv5;

    public ResidualDenseBlock_5C(int nf, int gc) : base(nameof(ResidualDenseBlock_5C))
    {
        conv1 = nn.Conv2d(nf, gc, 3, 1, 1);
        conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1);
        conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1);
        conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1);
        conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var x1 = LRelu(conv1.Run(x));
        var x2 = LRelu(conv2.Run(cat(new[] { x, x1 }, 1)));
        var x3 = LRelu(conv3.Run(cat(new[] { x, x1, x2 }, 1)));
        var x4 = LRelu(conv4.Run(cat(new[] { x, x1, x2, x3 }, 1)));
        var x5 = conv5.Run(cat(new[] { x, x1, x2, x3, x4 }, 1));
        // Residual scaling 0.2 keeps the very deep trunk stable (ESRGAN).
        return scope.MoveToOuter(x5 * 0.2 + x);
    }

    internal static Tensor LRelu(Tensor x) => nn.functional.leaky_relu(x, 0.2);
}

/// <summary>Residual-in-residual dense block: three dense blocks and an outer 0.2-scaled skip.</summary>
public sealed class RRDB : nn.Module<Tensor, Tensor>
{
    private readonly ResidualDenseBlock_5C RDB1, RDB2, RDB3;

    public RRDB(int nf, int gc) : base(nameof(RRDB))
    {
        RDB1 = new ResidualDenseBlock_5C(nf, gc);
        RDB2 = new ResidualDenseBlock_5C(nf, gc);
        RDB3 = new ResidualDenseBlock_5C(nf, gc);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var o = RDB3.forward(RDB2.forward(RDB1.forward(x)));
        return scope.MoveToOuter(o * 0.2 + x);
    }
}

/// <summary>
/// BSRNet, the stage-1 cleaner of DiffBIR v2 blind super-resolution: ESRGAN's RRDBNet trained with BSRGAN
/// degradations (official <c>diffbir.model.bsrnet.RRDBNet</c>). Maps an image in [0, 1] to its ×<c>sf</c> restoration.
/// </summary>
public sealed class RRDBNet : nn.Module<Tensor, Tensor>
{
    private readonly Conv2d conv_first;
    private readonly Sequential RRDB_trunk;
    private readonly Conv2d trunk_conv;
    private readonly Conv2d upconv1;
    private readonly Conv2d? upconv2;
    private readonly Conv2d HRconv;
    private readonly Conv2d conv_last;

    /// <summary>The configuration this network was built from.</summary>
    public RRDBNetConfig Config { get; }

    /// <summary>Builds the network (parameters uninitialised: load a state dict).</summary>
    public RRDBNet(RRDBNetConfig config) : base(nameof(RRDBNet))
    {
        Config = config;
        conv_first = nn.Conv2d(config.InNc, config.Nf, 3, 1, 1);
        RRDB_trunk = nn.Sequential(Enumerable.Range(0, config.Nb)
            .Select(i => (i.ToString(), (nn.Module<Tensor, Tensor>)new RRDB(config.Nf, config.Gc))).ToArray());
        trunk_conv = nn.Conv2d(config.Nf, config.Nf, 3, 1, 1);
        upconv1 = nn.Conv2d(config.Nf, config.Nf, 3, 1, 1);
        // The official code has a second upsampling conv only for sf == 4 (sf 2 and anything else: one ×2 step).
        if (config.Sf == 4) upconv2 = nn.Conv2d(config.Nf, config.Nf, 3, 1, 1);
        HRconv = nn.Conv2d(config.Nf, config.Nf, 3, 1, 1);
        conv_last = nn.Conv2d(config.Nf, config.OutNc, 3, 1, 1);
        RegisterComponents();
    }

    /// <summary>x: [B, in_nc, H, W] → [B, out_nc, sf·H, sf·W] (sf·H is 2H unless sf == 4).</summary>
    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var fea = conv_first.Run(x);
        fea = fea + trunk_conv.Run(RRDB_trunk.forward(fea));
        fea = ResidualDenseBlock_5C.LRelu(upconv1.Run(Nearest2x(fea)));
        if (upconv2 is not null) fea = ResidualDenseBlock_5C.LRelu(upconv2.Run(Nearest2x(fea)));
        var y = conv_last.Run(ResidualDenseBlock_5C.LRelu(HRconv.Run(fea)));
        return scope.MoveToOuter(y);
    }

    internal static Tensor Nearest2x(Tensor x) =>
        nn.functional.interpolate(x, scale_factor: new[] { 2.0, 2.0 }, mode: InterpolationMode.Nearest);
}
