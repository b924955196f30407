using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Diffusion;

/// <summary>
/// Replays recorded draws in order (the fixtures' <c>in.&lt;run&gt;.noise</c>, stacked [K, ...]). Asking for more
/// draws than were recorded, or for a different shape, is an error that names the draw.
/// </summary>
public sealed class ReplayNoise : INoiseSource
{
    readonly Tensor? _draws;
    public int Used { get; private set; }
    public int Count => _draws is null ? 0 : (int)_draws.shape[0];

    public ReplayNoise(Tensor? stacked) => _draws = stacked;

    public Tensor Next(Tensor like)
    {
        if (_draws is null || Used >= _draws.shape[0])
            throw new InvalidOperationException($"noise draw {Used} requested, but only {Count} were recorded");
        var t = _draws[Used];
        if (!t.shape.SequenceEqual(like.shape))
            throw new InvalidOperationException(
                $"noise draw {Used}: recorded shape [{string.Join(",", t.shape)}], sampler asked for [{string.Join(",", like.shape)}]");
        Used++;
        return t.to(like.dtype).to(like.device);
    }
}
