package coord

import (
	"flag"
	"fmt"
	"os"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// PasswordEnv is the environment variable EtcdSecurity reads the etcd
// password from when no PasswordFile is given: passwords never go on a
// command line, where any user of the host can read them.
const PasswordEnv = "BATON_ETCD_PASSWORD"

// EtcdSecurity says how a process proves itself to etcd: TLS (the CA that
// signed the members' certificates, and a client certificate when the
// members require one) and an etcd user (see SetupRoles for the roles).
// The zero value is plaintext and anonymous.
type EtcdSecurity struct {
	CAFile, CertFile, KeyFile string // PEM files; see LoadTLS
	User                      string
	// PasswordFile holds User's password (its first line). Empty means
	// the environment variable PasswordEnv.
	PasswordFile string
}

// Flags registers -etcd-cacert, -etcd-cert, -etcd-key, -etcd-user and
// -etcd-password-file on fs, filling s.
func (s *EtcdSecurity) Flags(fs *flag.FlagSet) {
	fs.StringVar(&s.CAFile, "etcd-cacert", "", "CA certificate (PEM) that signed the etcd members' certificates; enables TLS")
	fs.StringVar(&s.CertFile, "etcd-cert", "", "client certificate (PEM) for etcd, with -etcd-key")
	fs.StringVar(&s.KeyFile, "etcd-key", "", "client certificate key (PEM) for etcd")
	fs.StringVar(&s.User, "etcd-user", "", "etcd user with a password (from -etcd-password-file or $"+PasswordEnv+"); omit it to be the user named by the client certificate's CN, which etcd never has to log in")
	fs.StringVar(&s.PasswordFile, "etcd-password-file", "", "file whose first line is the etcd user's password")
}

// Apply sets cfg's TLS, Username and Password from s. It fails with
// ErrInvalidConfig when a file cannot be read or a user has no password.
func (s EtcdSecurity) Apply(cfg *clientv3.Config) error {
	if s.CAFile != "" || s.CertFile != "" || s.KeyFile != "" {
		tlsCfg, err := LoadTLS(s.CAFile, s.CertFile, s.KeyFile)
		if err != nil {
			return err
		}
		cfg.TLS = tlsCfg
	}
	if s.User == "" {
		if s.PasswordFile != "" {
			return fmt.Errorf("coord: %w: a password file without a user", ErrInvalidConfig)
		}
		return nil
	}
	password := os.Getenv(PasswordEnv)
	if s.PasswordFile != "" {
		data, err := os.ReadFile(s.PasswordFile)
		if err != nil {
			return fmt.Errorf("coord: %w: password file: %v", ErrInvalidConfig, err)
		}
		password, _, _ = strings.Cut(string(data), "\n")
		password = strings.TrimSuffix(password, "\r")
	}
	if password == "" {
		return fmt.Errorf("coord: %w: etcd user %q has no password (set -etcd-password-file or $%s)", ErrInvalidConfig, s.User, PasswordEnv)
	}
	cfg.Username, cfg.Password = s.User, password
	return nil
}
