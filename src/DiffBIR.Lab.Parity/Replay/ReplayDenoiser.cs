using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Diffusion;

/// <summary>
/// A stand-in for ControlLDM that returns the recorded output of call k (fixture <c>out.&lt;run&gt;.call.NN.out</c>)
/// and records the x and t it was given, so a sampler can be checked against the official run without the UNet:
/// its inputs to every call, its step states and its final latent must match the recording.
/// </summary>
public sealed class ReplayDenoiser : IDenoiser
{
    readonly IReadOnlyList<Tensor> _outputs;
    public List<Tensor> Xs { get; } = new();
    public List<Tensor> Ts { get; } = new();
    public int Calls => Xs.Count;

    public ReplayDenoiser(IReadOnlyList<Tensor> outputs) => _outputs = outputs;

    public Tensor Forward(Tensor x, Tensor t, Conditioning cond)
    {
        int k = Xs.Count;
        if (k >= _outputs.Count)
            throw new InvalidOperationException($"model call {k} made, but only {_outputs.Count} were recorded");
        // Keep copies outside any dispose scope: the caller compares them after the run.
        Xs.Add(x.detach().clone().DetachFromDisposeScope());
        Ts.Add(t.detach().clone().DetachFromDisposeScope());
        var o = _outputs[k];
        if (!o.shape.SequenceEqual(x.shape))
            throw new InvalidOperationException(
                $"model call {k}: recorded output [{string.Join(",", o.shape)}] but input is [{string.Join(",", x.shape)}]");
        return o.alias();
    }
}
