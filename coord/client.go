package coord

import (
	"context"
	"fmt"
	"time"

	"github.com/batonhq/baton/internal/zaplog"
	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
)

// ClientConfig returns the etcd client settings baton recommends for a
// server or worker process: gRPC keepalive pings so that a blackholed
// connection is torn down and redialled instead of hanging, and the
// client's zap logs routed to logger at warn level and above (nil discards
// them). gRPC refuses ping intervals below 10 s (it raises them to 10 s),
// so a dead connection is found after about 12 s; baton's safety never
// waits for that — the session's guard and every call's deadline do not
// depend on it.
//
// Reconnection backs off from 100 ms to at most 1 s (gRPC's default grows
// to 2 minutes): after etcd or the network comes back, a server must be
// confirming its lease again within a second, not whenever its backoff
// says.
func ClientConfig(endpoints []string, logger hclog.Logger) clientv3.Config {
	return clientv3.Config{
		Endpoints:            endpoints,
		DialTimeout:          5 * time.Second,
		DialKeepAliveTime:    10 * time.Second,
		DialKeepAliveTimeout: 2 * time.Second,
		// No pings while the client has no stream: etcd answers those with
		// GOAWAY "too_many_pings", and an idle client has nothing to protect.
		PermitWithoutStream: false,
		Logger:              zaplog.New(logger, zapcore.WarnLevel),
		DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
			Backoff: backoff.Config{
				BaseDelay:  100 * time.Millisecond,
				Multiplier: 1.6,
				Jitter:     0.2,
				MaxDelay:   time.Second,
			},
			MinConnectTimeout: 2 * time.Second,
		})},
	}
}

// Dial creates a client with ClientConfig and makes sure etcd answers a
// linearizable read before ctx ends: clientv3.New does not block, so an
// unreachable cluster would otherwise only show up at the first call.
// The caller owns the returned client and closes it.
func Dial(ctx context.Context, endpoints []string, logger hclog.Logger) (*clientv3.Client, error) {
	cli, err := clientv3.New(ClientConfig(endpoints, logger))
	if err != nil {
		return nil, fmt.Errorf("coord: etcd client for %v: %w", endpoints, err)
	}
	if err := Probe(ctx, cli); err != nil {
		cli.Close()
		return nil, err
	}
	return cli, nil
}

// Probe performs one count-only linearizable read; it returns nil when the
// cluster has a leader and answered before ctx ended.
func Probe(ctx context.Context, cli *clientv3.Client) error {
	if _, err := cli.Get(clientv3.WithRequireLeader(ctx), "/", clientv3.WithCountOnly()); err != nil {
		return fmt.Errorf("coord: etcd at %v did not answer: %w", cli.Endpoints(), err)
	}
	return nil
}
