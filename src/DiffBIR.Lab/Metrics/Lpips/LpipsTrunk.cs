using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Metrics.Lpips;

/// <summary>
/// The LPIPS trunk (official <c>lpips_arch.alexnet</c> / <c>lpips_arch.vgg16</c>): torchvision's AlexNet or VGG16
/// <c>features</c> cut into five slices, each ending in a ReLU whose output LPIPS compares. The layers keep their
/// torchvision indices as names (<c>slice2.3</c> is <c>features[3]</c>), so the keys are the official
/// <c>net.sliceK.&lt;index&gt;.weight</c>.
/// </summary>
public sealed class LpipsTrunk : nn.Module<Tensor, Tensor[]>
{
    private readonly Sequential slice1, slice2, slice3, slice4, slice5;

    public LpipsTrunk(bool vgg) : base(vgg ? "vgg16" : "alexnet")
    {
        var features = vgg ? Vgg16Features() : AlexNetFeatures();
        // Slice boundaries (features indices) of the official classes.
        int[] cuts = vgg ? new[] { 0, 4, 9, 16, 23, 30 } : new[] { 0, 2, 5, 8, 10, 12 };
        var slices = new Sequential[5];
        for (int s = 0; s < 5; s++)
            slices[s] = nn.Sequential(Enumerable.Range(cuts[s], cuts[s + 1] - cuts[s])
                .Select(i => (i.ToString(), features[i])).ToArray());
        (slice1, slice2, slice3, slice4, slice5) = (slices[0], slices[1], slices[2], slices[3], slices[4]);
        RegisterComponents();
    }

    /// <summary>torchvision <c>alexnet().features</c> (indices 0..11 are used; the final max-pool, 12, is not).</summary>
    static nn.Module<Tensor, Tensor>[] AlexNetFeatures() => new nn.Module<Tensor, Tensor>[]
    {
        nn.Conv2d(3, 64, 11, stride: 4, padding: 2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding: 2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding: 1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding: 1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding: 1), nn.ReLU(),
    };

    /// <summary>torchvision <c>vgg16().features</c> (configuration D, indices 0..29; the final max-pool, 30, is not used).</summary>
    static nn.Module<Tensor, Tensor>[] Vgg16Features()
    {
        var layers = new List<nn.Module<Tensor, Tensor>>();
        int inCh = 3;
        foreach (var v in new[] { 64, 64, -1, 128, 128, -1, 256, 256, 256, -1, 512, 512, 512, -1, 512, 512, 512 })
        {
            if (v < 0) { layers.Add(nn.MaxPool2d(2, 2)); continue; }
            layers.Add(nn.Conv2d(inCh, v, 3, padding: 1));
            layers.Add(nn.ReLU());
            inCh = v;
        }
        return layers.ToArray();
    }

    /// <summary>The five slice outputs (relu1..relu5 of AlexNet; relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of VGG16).</summary>
    public override Tensor[] forward(Tensor x)
    {
        var outs = new Tensor[5];
        var h = x;
        var slices = new[] { slice1, slice2, slice3, slice4, slice5 };
        for (int s = 0; s < 5; s++) outs[s] = h = slices[s].forward(h);
        return outs;
    }
}
