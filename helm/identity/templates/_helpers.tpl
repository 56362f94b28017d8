{{/* vim: set filetype=mustache: */}}

{{/* Chart name, at most 63 characters. */}}
{{- define "identity.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name for resources: <release>-<chart> unless the release name contains the chart name. */}}
{{- define "identity.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "identity.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource, without the component. */}}
{{- define "identity.commonLabels" -}}
helm.sh/chart: {{ include "identity.chart" . }}
app.kubernetes.io/name: {{ include "identity.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: identity
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of the server's resources. */}}
{{- define "identity.labels" -}}
{{ include "identity.commonLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{/* Labels of the migration hook's resources. */}}
{{- define "identity.migrationLabels" -}}
{{ include "identity.commonLabels" . }}
app.kubernetes.io/component: migration
{{- end }}

{{/* Selector labels of the server pods. */}}
{{- define "identity.selectorLabels" -}}
app.kubernetes.io/name: {{ include "identity.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{- define "identity.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "identity.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "identity.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}
{{- end }}

{{/* Name of the Secret the server reads: the existing one, or the chart's. */}}
{{- define "identity.secretName" -}}
{{- default (include "identity.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/*
Secret variables: the value under `secrets`, the environment variable the
binary reads (or <NAME>_FILE with mountAsFiles), the key in the chart-created
Secret when secrets.keys.<value> is "", whether it is required, and whether
the migration Job needs it. To add one: a line here, a value and a key in
values.yaml and values.schema.json, and a row in README.md.
*/}}
{{- define "identity.secretVariables" -}}
- {value: databaseUrl, env: IDENTITY_DATABASE_URL, key: database-url, required: true, job: true}
- {value: apiKeys, env: IDENTITY_API_KEYS, key: api-keys, required: true, job: false}
- {value: legacyJwtSecret, env: IDENTITY_LEGACY_JWT_SECRET, key: legacy-jwt-secret, required: false, job: false}
- {value: clerkSecretKey, env: IDENTITY_CLERK_SECRET_KEY, key: clerk-secret-key, required: false, job: false}
- {value: clerkJwtKey, env: IDENTITY_CLERK_JWT_KEY, key: clerk-jwt-key, required: false, job: false}
- {value: smtpUrl, env: IDENTITY_SMTP_URL, key: smtp-url, required: false, job: false}
- {value: clerkWebhookSecret, env: IDENTITY_CLERK_WEBHOOK_SECRET, key: clerk-webhook-secret, required: false, job: false}
{{- end }}

{{/* The value of a secret variable as a string (apiKeys may be a list). Arguments: root, value. */}}
{{- define "identity.secretValue" -}}
{{- $v := index .root.Values.secrets .value -}}
{{- if kindIs "slice" $v }}{{ join ";" $v }}{{ else if kindIs "invalid" $v }}{{ else }}{{ toString $v }}{{ end -}}
{{- end }}

{{/*
The secret variables this release passes to the server, as a YAML list of
{value, env, key, job}: the required ones, and each optional one that has a
value (chart-created Secret) or a key named in secrets.keys (existing Secret).
*/}}
{{- define "identity.wiredSecrets" -}}
{{- $root := . -}}
{{- $existing := .Values.secrets.existingSecret -}}
{{- $out := list -}}
{{- range (include "identity.secretVariables" . | fromYamlArray) }}
{{- $named := index $root.Values.secrets.keys .value | default "" }}
{{- $key := $named | default .key }}
{{- $wired := or .required (ternary $named (include "identity.secretValue" (dict "root" $root "value" .value)) (not (empty $existing))) }}
{{- if $wired }}
{{- $out = append $out (dict "value" .value "env" .env "key" $key "job" .job) }}
{{- end }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/* Whether replicas migrate on start. */}}
{{- define "identity.migrateOnStart" -}}
{{- if kindIs "invalid" .Values.config.migrateOnStart }}
{{- ternary "false" "true" .Values.migration.enabled }}
{{- else }}
{{- ternary "true" "false" .Values.config.migrateOnStart }}
{{- end }}
{{- end }}

{{/*
The mail transport the server ends up with: config.mail.transport, or (like
the binary) smtp when the SMTP URL is wired, else log.
*/}}
{{- define "identity.mailTransport" -}}
{{- $t := toString (.Values.config.mail.transport | default "") | trim }}
{{- if $t }}{{ $t }}
{{- else if include "identity.wiredSecrets" . | contains "IDENTITY_SMTP_URL" }}smtp
{{- else }}log
{{- end }}
{{- end }}

{{/* Whether the NetworkPolicy allows SMTP: networkPolicy.egress.smtp.enabled, or with null the smtp transport. */}}
{{- define "identity.smtpEgress" -}}
{{- $enabled := .Values.networkPolicy.egress.smtp.enabled }}
{{- if kindIs "invalid" $enabled }}
{{- ternary "true" "" (eq (include "identity.mailTransport" .) "smtp") }}
{{- else }}
{{- ternary "true" "" $enabled }}
{{- end }}
{{- end }}

{{/* Listen address from config.listenHost and config.port (IPv6 hosts get brackets). */}}
{{- define "identity.listenAddr" -}}
{{- $host := .Values.config.listenHost -}}
{{- if contains ":" $host }}{{ printf "[%s]:%d" $host (int64 .Values.config.port) }}{{ else }}{{ printf "%s:%d" $host (int64 .Values.config.port) }}{{ end -}}
{{- end }}

{{/* Whether the HTTP listener is on: "true", or "" when nothing needs it. */}}
{{- define "identity.httpListener" -}}
{{- if or .Values.metrics.enabled .Values.forwardAuth.enabled .Values.ingress.enabled }}true{{ end -}}
{{- end }}

{{/* Metrics listen address: config.listenHost (all interfaces) and metrics.port. */}}
{{- define "identity.metricsAddr" -}}
{{- $host := .Values.config.listenHost -}}
{{- if contains ":" $host }}{{ printf "[%s]:%d" $host (int64 .Values.metrics.port) }}{{ else }}{{ printf "%s:%d" $host (int64 .Values.metrics.port) }}{{ end -}}
{{- end }}

{{/* Whether the NetworkPolicy allows OTLP: networkPolicy.egress.otlp.enabled, or with null tracing.enabled. */}}
{{- define "identity.otlpEgress" -}}
{{- $enabled := .Values.networkPolicy.egress.otlp.enabled }}
{{- if kindIs "invalid" $enabled }}
{{- ternary "true" "" (eq (toString .Values.tracing.enabled) "true") }}
{{- else }}
{{- ternary "true" "" $enabled }}
{{- end }}
{{- end }}

{{/*
Environment entry of OTEL_EXPORTER_OTLP_HEADERS from tracing.headers (a
Secret key: the headers usually carry a collector's API key), or nothing.
*/}}
{{- define "identity.tracingEnv" -}}
{{- $t := .Values.tracing }}
{{- if and $t.enabled $t.headers.secretName }}
- name: OTEL_EXPORTER_OTLP_HEADERS
  valueFrom:
    secretKeyRef:
      name: {{ $t.headers.secretName | quote }}
      key: {{ $t.headers.secretKey | quote }}
{{- end }}
{{- end }}

{{/*
The users-table mapping (config.usersTable) as a YAML map NAME: "value". Here
"" is not "unset": null leaves a variable out, so the binary's default
applies, while "" is rendered as an empty value, which the binary reads as
"the table has no such column". The replicas (ConfigMap) and the migration
Job get the same mapping.
*/}}
{{- define "identity.usersTableEnv" -}}
{{- $u := .Values.config.usersTable | default dict -}}
{{- $d := dict -}}
{{- $vars := dict
  "IDENTITY_USERS_TABLE" $u.table
  "IDENTITY_USERS_ID_COLUMN" $u.idColumn
  "IDENTITY_USERS_EMAIL_COLUMN" $u.emailColumn
  "IDENTITY_USERS_PASSWORD_HASH_COLUMN" $u.passwordHashColumn
  "IDENTITY_USERS_CREATED_AT_COLUMN" $u.createdAtColumn
  "IDENTITY_USERS_DELETED_AT_COLUMN" $u.deletedAtColumn
  "IDENTITY_USERS_CLERK_ID_COLUMN" $u.clerkIdColumn
-}}
{{- range $k, $v := $vars }}
{{- if not (kindIs "invalid" $v) }}
{{- $_ := set $d $k (toString $v | trim) }}
{{- end }}
{{- end }}
{{- toYaml $d }}
{{- end }}

{{/*
Non-secret configuration as a YAML map NAME: "value" (the ConfigMap's data).
`values.env` entries come last and win.
*/}}
{{- define "identity.configEnv" -}}
{{- $c := .Values.config -}}
{{- $d := dict
  "IDENTITY_LISTEN_ADDR" (include "identity.listenAddr" .)
  "IDENTITY_LOG_FORMAT" (toString $c.logFormat)
  "IDENTITY_LOG_LEVEL" (toString $c.logLevel)
  "IDENTITY_DATABASE_MAX_CONNECTIONS" (printf "%d" (int64 $c.databaseMaxConnections))
  "IDENTITY_SHUTDOWN_GRACE_SECONDS" (printf "%d" (int64 $c.shutdownGraceSeconds))
  "IDENTITY_HEALTH_INTERVAL_SECONDS" (printf "%d" (int64 $c.healthIntervalSeconds))
  "IDENTITY_SETTINGS_REFRESH_SECONDS" (printf "%d" (int64 $c.settingsRefreshSeconds))
  "IDENTITY_MAX_REQUEST_BYTES" (printf "%d" (int64 $c.maxRequestBytes))
  "IDENTITY_MIGRATE_ON_START" (include "identity.migrateOnStart" .)
-}}
{{- $optional := dict
  "IDENTITY_LEGACY_JWT_ALGORITHM" $c.legacyJwt.algorithm
  "IDENTITY_LEGACY_JWT_ISSUER" $c.legacyJwt.issuer
  "IDENTITY_LEGACY_JWT_AUDIENCE" $c.legacyJwt.audience
  "IDENTITY_LEGACY_JWT_USER_CLAIM" $c.legacyJwt.userClaim
  "IDENTITY_CLERK_PUBLISHABLE_KEY" $c.clerk.publishableKey
  "IDENTITY_CLERK_ISSUER" $c.clerk.issuer
  "IDENTITY_CLERK_JWKS_URL" $c.clerk.jwksUrl
  "IDENTITY_CLERK_API_URL" $c.clerk.apiUrl
  "IDENTITY_CLERK_AUTHORIZED_PARTIES" (join "," (default (list) $c.clerk.authorizedParties))
  "IDENTITY_CLERK_LEEWAY_SECONDS" $c.clerk.leewaySeconds
  "IDENTITY_CLERK_JWKS_REFRESH_SECONDS" $c.clerk.jwksRefreshSeconds
  "IDENTITY_CLERK_JWKS_COOLDOWN_SECONDS" $c.clerk.jwksCooldownSeconds
  "IDENTITY_CLERK_JWKS_MAX_STALENESS_SECONDS" $c.clerk.jwksMaxStalenessSeconds
  "IDENTITY_UNMAPPED_CLERK_USER" $c.clerk.unmappedUser
  "IDENTITY_REJECT_LEGACY_AFTER_MIGRATION" $c.verification.rejectLegacyAfterMigration
  "IDENTITY_MAX_TOKEN_BYTES" $c.verification.maxTokenBytes
  "IDENTITY_TOKEN_CACHE_SIZE" $c.verification.tokenCacheSize
  "IDENTITY_USER_CACHE_SECONDS" $c.verification.userCacheSeconds
  "IDENTITY_REVOCATION_DEFAULT_SECONDS" $c.verification.revocationDefaultSeconds
  "IDENTITY_FRONTEND_URL" $c.invitations.frontendUrl
  "IDENTITY_PRODUCT_NAME" $c.invitations.productName
  "IDENTITY_INVITATION_TTL_SECONDS" $c.invitations.ttlSeconds
  "IDENTITY_INVITES_PER_USER_PER_HOUR" $c.invitations.perUserPerHour
  "IDENTITY_INVITES_PER_CALLER_PER_MINUTE" $c.invitations.perCallerPerMinute
  "IDENTITY_MIGRATION_LINK" $c.invitations.link
  "IDENTITY_MAIL_TRANSPORT" $c.mail.transport
  "IDENTITY_MAIL_FROM" $c.mail.from
  "IDENTITY_MAIL_DIR" $c.mail.dir
  "IDENTITY_SMTP_ALLOW_PLAINTEXT" $c.mail.allowPlaintext
  "IDENTITY_OUTBOX_POLL_SECONDS" $c.mail.outbox.pollSeconds
  "IDENTITY_OUTBOX_MAX_ATTEMPTS" $c.mail.outbox.maxAttempts
  "IDENTITY_OUTBOX_RETRY_BASE_SECONDS" $c.mail.outbox.retryBaseSeconds
  "IDENTITY_OUTBOX_SEND_TIMEOUT_SECONDS" $c.mail.outbox.sendTimeoutSeconds
  "IDENTITY_BULK_LEASE_SECONDS" $c.bulk.leaseSeconds
  "IDENTITY_STATS_FLUSH_SECONDS" $c.statsFlushSeconds
  "IDENTITY_CLERK_WEBHOOK_RETENTION_DAYS" $c.clerkWebhookRetentionDays
  "IDENTITY_DASHBOARD" $c.dashboard
  "IDENTITY_GATEWAY_HEADER_PREFIX" $c.gateway.headerPrefix
  "IDENTITY_GATEWAY_HEADERS" (join "," (default (list) $c.gateway.headers))
  "IDENTITY_GATEWAY_REMOVE_AUTHORIZATION" $c.gateway.removeAuthorization
  "IDENTITY_FORWARD_AUTH" $c.gateway.forwardAuth
  "IDENTITY_EXT_AUTHZ" $c.gateway.extAuthz
-}}
{{- range $k, $v := $optional }}
{{- if kindIs "float64" $v }}
{{- $_ := set $d $k (printf "%d" (int64 $v)) }}
{{- else if kindIs "bool" $v }}
{{- $_ := set $d $k (ternary "true" "false" $v) }}
{{- else if and (not (kindIs "invalid" $v)) (ne (toString $v) "") }}
{{- $_ := set $d $k (toString $v) }}
{{- end }}
{{- end }}
{{- /* The users-table mapping, where "" is rendered (it differs from unset). */ -}}
{{- range $k, $v := (include "identity.usersTableEnv" . | fromYaml) }}
{{- $_ := set $d $k $v }}
{{- end }}
{{- /* A fractional number: not through the whole-number conversion above. */ -}}
{{- if not (kindIs "invalid" $c.bulk.clerkRequestsPerSecond) }}
{{- $_ := set $d "IDENTITY_CLERK_API_RATE" (toString $c.bulk.clerkRequestsPerSecond) }}
{{- end }}
{{- /* The HTTP listener (/metrics, /forward-auth, /webhooks/clerk) on its own port (the binary's default is loopback only), or off. */ -}}
{{- if include "identity.httpListener" . }}
{{- $_ := set $d "IDENTITY_METRICS_ADDR" (include "identity.metricsAddr" .) }}
{{- else }}
{{- $_ := set $d "IDENTITY_METRICS_ADDR" "off" }}
{{- end }}
{{- /* OpenTelemetry trace export (standard OTEL_* variables read by the SDK); nothing when off. */ -}}
{{- $t := .Values.tracing }}
{{- if $t.enabled }}
{{- $_ := set $d "OTEL_EXPORTER_OTLP_ENDPOINT" (toString $t.endpoint | trim) }}
{{- $_ := set $d "OTEL_SERVICE_NAME" (toString $t.serviceName) }}
{{- with $t.sampler.type }}
{{- $_ := set $d "OTEL_TRACES_SAMPLER" (toString .) }}
{{- end }}
{{- if not (kindIs "invalid" $t.sampler.arg) }}
{{- $_ := set $d "OTEL_TRACES_SAMPLER_ARG" (toString $t.sampler.arg) }}
{{- end }}
{{- end }}
{{- range $k, $v := .Values.env }}
{{- if kindIs "float64" $v }}
{{- $_ := set $d $k (printf "%d" (int64 $v)) }}
{{- else if kindIs "bool" $v }}
{{- $_ := set $d $k (ternary "true" "false" $v) }}
{{- else }}
{{- $_ := set $d $k (toString $v) }}
{{- end }}
{{- end }}
{{- toYaml $d }}
{{- end }}

{{/*
Environment entries for the secret variables. Arguments: root, job (bool:
only the variables the migration Job needs), secretName.
*/}}
{{- define "identity.secretEnv" -}}
{{- $root := .root -}}
{{- range (include "identity.wiredSecrets" $root | fromYamlArray) }}
{{- if or (not $.job) .job }}
{{- if $root.Values.secrets.mountAsFiles }}
- name: {{ .env }}_FILE
  value: {{ printf "%s/%s" (trimSuffix "/" $root.Values.secrets.mountPath) .key | quote }}
{{- else }}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ $.secretName | quote }}
      key: {{ .key | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Items of the secret volume (mountAsFiles). Arguments: root, job. */}}
{{- define "identity.secretItems" -}}
{{- range (include "identity.wiredSecrets" .root | fromYamlArray) }}
{{- if or (not $.job) .job }}
- key: {{ .key | quote }}
  path: {{ .key | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Data of a chart-created Secret, base64. Arguments: root, job. */}}
{{- define "identity.secretData" -}}
{{- range (include "identity.wiredSecrets" .root | fromYamlArray) }}
{{- if or (not $.job) .job }}
{{ .key | quote }}: {{ include "identity.secretValue" (dict "root" $.root "value" .value) | b64enc | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Refuses values the binary or Kubernetes would reject, with a clear message. */}}
{{- define "identity.validate" -}}
{{- $v := .Values -}}
{{- if not $v.secrets.existingSecret }}
{{- /* Required at install, not in values.schema.json: the defaults leave them
empty so that `helm lint` (and chart-testing's `ct lint`) pass on the chart
as shipped, while install and template stop here, naming what is missing.
(Helm's lint mode turns `fail` into a log line.) */}}
{{- $missing := list }}
{{- range (include "identity.secretVariables" . | fromYamlArray) }}
{{- if and .required (not (include "identity.secretValue" (dict "root" $ "value" .value))) }}
{{- $missing = append $missing (printf "secrets.%s (%s)" .value .env) }}
{{- end }}
{{- end }}
{{- if $missing }}
{{- fail (printf "missing required value%s %s: set %s, e.g. --set-string secrets.databaseUrl='postgres://USER:PASSWORD@HOST:5432/DB' --set-string secrets.apiKeys='NAME:SHA256HEX:verify' (create keys with `identity gen-api-key --name NAME --scopes verify`), or name an existing Secret holding them in secrets.existingSecret (keys secrets.keys.databaseUrl and secrets.keys.apiKeys)" (ternary "s" "" (gt (len $missing) 1)) (join " and " $missing) (ternary "them" "it" (gt (len $missing) 1))) }}
{{- else }}
{{- $url := include "identity.secretValue" (dict "root" . "value" "databaseUrl") }}
{{- if not (regexMatch "^(postgres://|postgresql://|sqlite:)" $url) }}
{{- fail "secrets.databaseUrl must start with postgres://, postgresql:// or sqlite:" }}
{{- end }}
{{- $keyCount := 0 }}
{{- range $i, $entry := regexSplit "[;\n]" (include "identity.secretValue" (dict "root" . "value" "apiKeys")) -1 }}
{{- $e := trim $entry }}
{{- if and $e (not (hasPrefix "#" $e)) }}
{{- if not (regexMatch "^[A-Za-z0-9._-]+:[0-9a-fA-F]{64}:(verify|migrate|admin|gateway)(,(verify|migrate|admin|gateway))*$" $e) }}
{{- fail (printf "secrets.apiKeys entry %d is not name:sha256hex:scope[,scope] (scopes: verify, migrate, admin, gateway); create entries with `identity gen-api-key`" (add1 $i)) }}
{{- end }}
{{- $keyCount = add1 $keyCount }}
{{- end }}
{{- end }}
{{- if eq $keyCount 0 }}
{{- fail "secrets.apiKeys has no entry: the service refuses to listen on a pod address without API keys" }}
{{- end }}
{{- end }}
{{- end }}
{{- $secretEnvs := list }}
{{- range (include "identity.secretVariables" . | fromYamlArray) }}
{{- $secretEnvs = append $secretEnvs .env }}
{{- $secretEnvs = append $secretEnvs (printf "%s_FILE" .env) }}
{{- end }}
{{- range $k, $_ := $v.env }}
{{- if has $k $secretEnvs }}
{{- fail (printf "env.%s: secret variables belong in secrets (or secrets.existingSecret), not in the ConfigMap" $k) }}
{{- end }}
{{- end }}
{{- $grace := int64 (include "identity.terminationGracePeriodSeconds" .) }}
{{- $needed := add (int64 $v.config.shutdownGraceSeconds) (int64 $v.preStopSleepSeconds) }}
{{- if le $grace $needed }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds + config.shutdownGraceSeconds (%d), or in-flight calls are killed" $grace $needed) }}
{{- end }}
{{- $clerk := $v.config.clerk }}
{{- if and (eq (toString $clerk.unmappedUser) "link_by_email") (not (include "identity.wiredSecrets" . | contains "IDENTITY_CLERK_SECRET_KEY")) }}
{{- fail "config.clerk.unmappedUser link_by_email needs secrets.clerkSecretKey (or secrets.keys.clerkSecretKey with existingSecret)" }}
{{- end }}
{{- $mail := $v.config.mail }}
{{- $smtpWired := include "identity.wiredSecrets" . | contains "IDENTITY_SMTP_URL" }}
{{- if and (eq (toString $mail.transport) "smtp") (not $smtpWired) }}
{{- fail "config.mail.transport smtp needs secrets.smtpUrl (or secrets.keys.smtpUrl with existingSecret)" }}
{{- end }}
{{- if eq (toString $mail.transport) "file" }}
{{- $dir := toString ($mail.dir | default "mail") | trim }}
{{- if not (hasPrefix "/" $dir) }}
{{- $dir = printf "/var/lib/identity/%s" $dir }}
{{- end }}
{{- $dir = clean $dir }}
{{- $writable := list "/tmp" "/var/lib/identity" }}
{{- range $v.extraVolumeMounts }}
{{- if and .mountPath (not .readOnly) }}
{{- $writable = append $writable (clean (toString .mountPath)) }}
{{- end }}
{{- end }}
{{- $ok := false }}
{{- range $writable }}
{{- if or (eq $dir .) (hasPrefix (printf "%s/" (trimSuffix "/" .)) $dir) }}
{{- $ok = true }}
{{- end }}
{{- end }}
{{- if not $ok }}
{{- fail (printf "config.mail.dir %s is on the read-only root filesystem: use a folder under /tmp or /var/lib/identity (emptyDirs), or mount a volume there with extraVolumes/extraVolumeMounts" $dir) }}
{{- end }}
{{- end }}
{{- with $v.config.usersTable }}
{{- if and (not (kindIs "invalid" .table)) (hasPrefix "identity_" (toString .table | splitList "." | last)) }}
{{- fail (printf "config.usersTable.table %s is one of the service's own tables (prefix identity_): name the application's users table" .table) }}
{{- end }}
{{- end }}
{{- $product := toString ($v.config.invitations.productName | default "") | trim }}
{{- if gt (len $product) 100 }}
{{- fail (printf "config.invitations.productName is %d bytes: the binary accepts at most 100 (UTF-8 bytes)" (len $product)) }}
{{- end }}
{{- if and $v.prometheusRule.enabled (not $v.metrics.enabled) }}
{{- fail "prometheusRule.enabled needs metrics.enabled: the alerts read the /metrics figures" }}
{{- end }}
{{- if and $v.grafanaDashboard.enabled (not $v.metrics.enabled) }}
{{- fail "grafanaDashboard.enabled needs metrics.enabled: the dashboard reads the /metrics figures" }}
{{- end }}
{{- if and $v.metrics.serviceMonitor.enabled (not $v.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled" }}
{{- end }}
{{- if and $v.forwardAuth.enabled (eq (toString $v.config.gateway.forwardAuth) "off") }}
{{- fail "forwardAuth.enabled exposes /forward-auth, which config.gateway.forwardAuth off turns off" }}
{{- end }}
{{- if $v.ingress.enabled }}
{{- if not (include "identity.wiredSecrets" . | contains "IDENTITY_CLERK_WEBHOOK_SECRET") }}
{{- fail "ingress.enabled routes /webhooks/clerk, which needs secrets.clerkWebhookSecret (or secrets.keys.clerkWebhookSecret with existingSecret)" }}
{{- end }}
{{- $port := int64 $v.ingress.servicePort }}
{{- if or (eq $port (int64 $v.service.port)) (and $v.metrics.enabled (eq $port (int64 $v.metrics.port))) (and $v.forwardAuth.enabled (eq $port (int64 $v.forwardAuth.port))) }}
{{- fail (printf "ingress.servicePort (%d) must differ from service.port and from the metrics and forward-auth Service ports" $port) }}
{{- end }}
{{- end }}
{{- if and (include "identity.httpListener" .) (eq (int64 $v.metrics.port) (int64 $v.config.port)) }}
{{- fail (printf "metrics.port (%d) must differ from config.port: the metrics endpoint has its own listener" (int64 $v.metrics.port)) }}
{{- end }}
{{- $t := $v.tracing }}
{{- if $t.enabled }}
{{- if not (toString $t.endpoint | trim) }}
{{- fail "tracing.enabled needs tracing.endpoint, the OTLP/gRPC collector, e.g. http://otel-collector.observability.svc:4317" }}
{{- end }}
{{- if and (has (toString $t.sampler.type) (list "traceidratio" "parentbased_traceidratio")) (kindIs "invalid" $t.sampler.arg) }}
{{- fail (printf "tracing.sampler.type %s needs tracing.sampler.arg, the sampled fraction 0-1" $t.sampler.type) }}
{{- end }}
{{- end }}
{{- if ne (empty $t.headers.secretName) (empty $t.headers.secretKey) }}
{{- fail "tracing.headers needs both secretName and secretKey (the Secret key holding OTEL_EXPORTER_OTLP_HEADERS, key=value,key=value)" }}
{{- end }}
{{- if $v.autoscaling.enabled }}
{{- if gt (int64 $v.autoscaling.minReplicas) (int64 $v.autoscaling.maxReplicas) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- if and (kindIs "invalid" $v.autoscaling.targetCPUUtilizationPercentage) (kindIs "invalid" $v.autoscaling.targetMemoryUtilizationPercentage) }}
{{- fail "autoscaling needs targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "identity.terminationGracePeriodSeconds" -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add (int64 .Values.config.shutdownGraceSeconds) (int64 .Values.preStopSleepSeconds) 10 }}
{{- else }}
{{- int64 .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* Probe body: native gRPC against grpc.health.v1. Arguments: root, probe. */}}
{{- define "identity.probe" -}}
grpc:
  port: {{ int64 .root.Values.config.port }}
  {{- if .probe.service }}
  service: {{ .probe.service | quote }}
  {{- end }}
{{- range $k := list "initialDelaySeconds" "periodSeconds" "timeoutSeconds" "failureThreshold" "successThreshold" }}
{{- if hasKey $.probe $k }}
{{ $k }}: {{ int64 (index $.probe $k) }}
{{- end }}
{{- end }}
{{- end }}
